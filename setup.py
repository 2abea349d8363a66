"""sapiens_jax: Sapiens human-centric vision foundation models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="sapiens_jax",
    version="0.1.0",
    description="JAX/Flax training code for the Sapiens family of human-centric vision models.",
    packages=setuptools.find_packages(include=["sapiens_jax", "sapiens_jax.*"]),
    package_data={"sapiens_jax.data": ["meta/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.7",
        "tensorflow-datasets>=4.9",
        "numpy>=1.26",
        "ml_dtypes>=0.5",  # bfloat16 in numpy: Sapiens2's RoPE tables are computed as upstream rounds them
        "einops>=0.8",
        "clu>=0.0.12",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "Pillow>=10.0",
        "opencv-python-headless>=4.8",  # affine warps, resizes and blurs of the task pipelines
        "pycocotools>=2.0.7",  # OKS AP for pose evaluation
        "tensorboard>=2.16",  # event files are written with tensorboard's own writer (no TensorFlow)
    ],
    extras_require={
        # scikit-image: its bundled astronaut photo is the real photo of the parity tests.
        # pytest-xdist: the suite runs in 2 worker processes (most of its time is single-threaded
        # XLA compilation, so the second core would otherwise idle).
        # transformers: its Sapiens2 port, which --format=transformers exports are tested against.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "scikit-image>=0.22", "transformers==5.23.0"],
        # Exact pin: any looser spelling may pull a CUDA build of several GB.
        "torch": ["torch==2.13.0", "safetensors>=0.4"],
        # Accelerators: JAX with its CUDA plugin (NVIDIA GPUs; cuDNN fused attention) or libtpu
        # (Cloud TPU VMs; Pallas splash attention), JAX's own spellings of the two.
        "cuda12": ["jax[cuda12]>=0.7"],
        "cuda13": ["jax[cuda13]>=0.7"],
        "tpu": ["jax[tpu]>=0.7"],
    },
)
