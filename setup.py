from setuptools import find_packages, setup

setup(
    name="gem-kernels",
    version="0.1.0",
    description="The GEM loss (Li et al., ICLR 2025) for LLM fine-tuning, as cheap as cross-entropy: "
    "streaming Triton kernels, a fused lm_head path and trainer integrations",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gem_kernels", "gem_kernels.*"]),
    python_requires=">=3.9",
    # torch is not pinned: CPU and CUDA builds are both fine (>= 2.6 for torch.library.triton_op).
    install_requires=["torch>=2.6"],
    extras_require={
        # triton comes with CUDA builds of torch; the interpreter (TRITON_INTERPRET=1) needs numpy.
        "triton": ["triton>=3.2", "numpy"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.2", "numpy"],
        "hf": ["transformers", "trl", "accelerate"],
        "bench": ["liger-kernel", "cut-cross-entropy", "matplotlib", "triton>=3.2", "numpy"],
    },
    license="Apache-2.0",
)
