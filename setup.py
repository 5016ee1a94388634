from setuptools import setup

# `kernels/` is installed as `fastdrag.kernels`: the top-level name `kernels` belongs to a PyPI package
# that diffusers probes for, so it must not be shadowed.
setup(
    name="fastdrag",
    version="0.1.0",
    description="A lean, fast engine for point-based (drag) image editing on Stable Diffusion 1.5",
    python_requires=">=3.10",
    packages=["fastdrag", "fastdrag.methods", "fastdrag.kernels", "fastdrag.benchmarks", "fastdrag.assets",
              "fastdrag.eval", "fastdrag.eval.metrics"],
    package_dir={"fastdrag.kernels": "kernels", "fastdrag.benchmarks": "benchmarks"},  # `fastdrag bench` runs them
    package_data={"fastdrag.assets": ["*.png", "*.js", "tiny_tokenizer/*"]},
    install_requires=[
        "torch>=2.4,<3",  # 2.13.0 here (CPU wheel), 2.11 on the GPU image
        "triton>=3.0",
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.13",
        "accelerate>=0.30",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=8", "gradio>=6,<7", "playwright>=1.50", "ray>=2.40"], "ui": ["gradio>=6,<7"],
                    "eval": ["ray>=2.40"]},
    entry_points={"console_scripts": ["fastdrag=fastdrag.cli:main"]},
)
