"""Data side of Detectax: COCO-format TFDS builder, shapes generator, tf.data pipeline."""
