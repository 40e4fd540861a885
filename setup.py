"""Detectax: Mask R-CNN in JAX/Flax as a Scenic research project."""

import setuptools

setuptools.setup(
    name='detectax',
    version='0.1.0',
    description='Mask R-CNN (ResNet-FPN) in JAX and Flax, written as a Scenic project.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['projects', 'projects.*', 'configs']),
    package_data={'projects.maskrcnn': ['CONVENTIONS.md'],
                  'projects.maskrcnn.kernels': ['*.cc']},
    install_requires=[
        'absl-py',
        'clu>=0.0.10',
        'flax>=0.10',
        'imgviz>=1.7',          # drawing predictions (predict, TensorBoard images)
        'jax>=0.4.35',
        'ml-collections>=0.1.1',
        'numpy>=1.26',
        'optax>=0.2.2',
        'orbax-checkpoint>=0.6',
        'pillow',
        'pycocotools>=2.0.7',
        'tensorflow>=2.16',
        'tensorflow-datasets>=4.9.4',
        'importlib-resources',  # tensorflow-datasets needs it to build datasets
        'tensorboard',          # clu's TensorBoard writer
        'tqdm',
        # oneDNN convolutions on the CPU backend (projects/maskrcnn/kernels), compiled on
        # first use with the system's C++ compiler; without them XLA's convolutions run.
        'onednn-cpu-gomp>=2023.0; sys_platform == "linux" and platform_machine == "x86_64"',
        'onednn-devel-cpu-gomp>=2023.0; sys_platform == "linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        'test': ['pytest>=7', 'pytest-xdist', 'chex', 'ruff'],
        'torch': ['torch', 'torchvision'],  # reading .pth checkpoints, golden files
    },
)
