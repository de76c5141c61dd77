"""svi-jax: Stable Video Infinity (error-recycling fine-tuning of Wan2.1) on JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "chex",
    "einops",
    "ml_collections",
    "absl-py",
    "numpy",
    "tensorflow-datasets>=4.9.7",
    "importlib_resources",  # tfds needs it to build datasets without TensorFlow
    "array_record",
    "imageio",
    "imageio-ffmpeg",
    "safetensors",
    "tqdm",
    "pillow",
    "sentencepiece",
    "ftfy",
    "scikit-image",
    "matplotlib",
    "tensorboardX",
    "pyloudnorm",  # SVI-Talk: ITU-R BS.1770 loudness normalisation of the audio (as official)
]

# PyTorch reference + converters. torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH = ["torch==2.13.0", "diffusers", "transformers", "peft", "safetensors"]

# DWPose skeletons from videos (python -m svi_jax.data pose): ONNX models on onnxruntime, OpenCV drawing.
POSE = ["onnxruntime", "opencv-python-headless"]

# the live web demo (python -m svi_jax.demo): a small ASGI app with server-sent events; the browser test drives
# Debian's chromium (installed by .ci/run) with Playwright, without a browser download
DEMO = ["starlette", "uvicorn", "python-multipart"]

setup(
    name="svi_jax",
    version="0.1.0",
    description="Stable Video Infinity (ERFT for Wan2.1) in JAX/Flax for TPU pods and CUDA",
    packages=find_packages(include=["svi_jax", "svi_jax.*", "configs", "bench"]),
    package_data={"svi_jax": ["assets/*", "assets/**/*", "demo/static/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "torch": TORCH,
        "pose": POSE,
        "demo": DEMO,
        "test": TORCH + POSE + DEMO + ["pytest", "pytest-xdist", "onnx", "httpx", "playwright"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # the TPU compiler only, for ahead-of-time plans on a host without a TPU (python -m svi_jax.plan --target tpu)
        "tpu-compile": ["libtpu==0.0.42.*"],
    },
)
