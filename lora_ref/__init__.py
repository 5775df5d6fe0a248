"""lora_ref: the reference implementation behind the LoRA & QLoRA course.

One idea per module (see CONTRIBUTING.md for the layers): lora (LoRA layer, injection, merge),
quant (NF4/FP4/int4 blockwise quantisation), memory (parameter/FLOP/memory arithmetic), qlora,
adapters (PEFT file format), models, data, training, serving, peft_family, drills, exercises.
"""
__version__ = "0.1.0"
