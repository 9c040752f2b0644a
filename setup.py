from setuptools import find_packages, setup

setup(
    name="lrformer-kernels",
    version="0.1.0",
    description="Fused Triton kernels for LRFormer (low-resolution self-attention) and the complete "
                "LRFormer model in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lrformer", "lrformer.*", "lrformer_kernels", "lrformer_kernels.*",
                                    "benchmarks", "benchmarks.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "einops", "pillow>=9", "tqdm>=4.60", "scipy>=1.7"],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU-only machines it runs the kernels in its
        # interpreter (tests) — install it explicitly there.
        "triton": ["triton>=3.6"],
        "test": ["pytest>=7", "triton>=3.6"],
        "bench": ["matplotlib>=3.5"],
        # ONNX export (lrformer.export_onnx, lrformer-export) and its onnxruntime check
        "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        # weights from the Hugging Face Hub (pretrained="hf://...") and .safetensors files
        "hub": ["huggingface_hub>=0.23", "safetensors>=0.4"],
    },
    entry_points={"console_scripts": [
        "lrformer-bench=benchmarks.__main__:main",
        "lrformer-flops=benchmarks.flops:main",
        "lrformer-train=lrformer.engine.train:cli",
        "lrformer-evaluate=lrformer.engine.evaluate:cli",
        "lrformer-predict=lrformer.engine.predict:cli",
        "lrformer-export=lrformer.engine.export:cli",
    ]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
