"""Preference and reward fine-tuning of the shipped digits model, one run per method.

The implementation is :mod:`jdiff.preference._experiment` (shared with ``jdiff prefer``):
Diffusion-DPO (LoRA), MaPO, Diffusion-KTO, D3PO, SPO, DDPO, DRaFT-1, DRaFT-LV and adjoint
reward backpropagation, each started from the committed digits U-Net, each reported as
mean reward before / after on the same seeds, win rate against the base model,
FD-digits to the real digits and wall time.

    python experiments/preference_digits.py [--methods dpo,mapo,...] [--reward class|thickness]
        [--target 3] [--prompt null|LABEL] [--eval 256] [--scale 1.0] [--out results.json] [--quick]
"""

from jdiff._xla import prefer_fast_cpu_compile

prefer_fast_cpu_compile()  # before JAX starts: XLA's faster-compiling CPU emitters

from jdiff.preference._experiment import main  # noqa: E402

if __name__ == "__main__":
    main()
