"""Hugging Face checkpoints in and out: ``pretrained`` (load a model directory, export one),
``weights`` (read checkpoint files lazily into a meta-built model), ``family`` (what a family is
to strata, and the mapping pieces they share) and one module per family (``llama``, ``mamba2``
with mamba_ssm's layout, ``bamba``, ``falcon_h1``, ``nemotron_h``, ``granite_hybrid``). Reading
HF configs and exporting need the optional ``transformers``; the weights need only safetensors."""
