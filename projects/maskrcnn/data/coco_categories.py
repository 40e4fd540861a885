"""The COCO instance categories by id, with no dependency (the converter and predict use it).

COCO 2014/2017 annotate 80 categories with ids 1..90; the ten ids in between were
named in the COCO paper (Lin et al. 2014, its 91 "thing" categories) but never
annotated. Models trained with one output per id (torchvision's 91-way heads,
background at 0) still have outputs for them.
"""

# The 80 annotated categories: (id, name), in the annotation files' order.
CATEGORIES = tuple(enumerate(('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus',
                              'train', 'truck', 'boat', 'traffic light', 'fire hydrant'), 1))
CATEGORIES += tuple(enumerate((
    'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe'), 13))
CATEGORIES += ((27, 'backpack'), (28, 'umbrella'))
CATEGORIES += tuple(enumerate((
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle'),
    31))
CATEGORIES += tuple(enumerate((
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed'), 46))
CATEGORIES += ((67, 'dining table'), (70, 'toilet'))
CATEGORIES += tuple(enumerate((
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator'), 72))
CATEGORIES += tuple(enumerate((
    'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush'), 84))

# The ids below 91 that the paper named and the annotations never use.
UNANNOTATED = ((12, 'street sign'), (26, 'hat'), (29, 'shoe'), (30, 'eye glasses'),
               (45, 'plate'), (66, 'mirror'), (68, 'window'), (69, 'desk'), (71, 'door'),
               (83, 'blender'))

# All 90 ids 1..90, as torchvision's 91-way heads index them (background at 0).
ALL_90 = tuple(sorted(CATEGORIES + UNANNOTATED))


def as_json(categories) -> dict:
    """{'categories': [{'id', 'name'}, ...]}, the format of categories.json."""
    return {'categories': [{'id': int(i), 'name': str(n)} for i, n in categories]}
