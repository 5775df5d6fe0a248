"""The seed article's QLoRA quantiser, kept as written (indentation restored, nothing else fixed), as the
baseline of the speed-up comparison (benchmarks/dequant_speed.py prints it) and of the error table
(benchmarks/quality_quant.py).

Its mistakes, which lora_ref.quant corrects, are left in on purpose:
  * the "NF4" table is wrong: symmetric (+-0.0911, +-0.1848, ... copied from the negative half), only 15
    real levels, and a 16th level of +inf; the real NF4 levels are asymmetric with 8 positive values
    (0.0796, 0.1609, ..., 0.7230, 1.0), see lora_ref.quant.nf4_code;
  * the scale is absmax / 7 (an int4 scale), so w / scale lies in [-7, 7] while the table is in [-1, 1]:
    almost every value saturates to the outermost levels or to +inf;
  * torch.searchsorted returns the insertion point, not the nearest level (always rounds up);
  * codes are kept one per int64 (8 bytes per weight instead of half a byte), scales in a Python list;
  * dequantise reshapes to (in_features, out_features) and forward transposes: the nn.Linear layout is
    (out, in), so the weight comes back scrambled unless it is square and symmetric;
  * a Python loop over blocks: about 22 s for one 11008 x 4096 weight (ANCHORS.md) on a CPU.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class QLoRALinear(nn.Module):
    """QLoRA combines 4-bit NF4 quantisation with LoRA (the article's class, verbatim)."""

    def __init__(self, in_features, out_features, rank=16, alpha=16.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        # 4-bit frozen base weight (to be quantised later)
        self.base_weight_4bit = None
        self.weight_scales = None
        # LoRA parameters kept in FP16/BF16
        self.lora_A = nn.Parameter(torch.randn(in_features, rank) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(rank, out_features))
        self.scaling = alpha / rank

    def quantize_weight(self, weight: torch.Tensor):
        """NF4 4-bit quantisation (block size 64)"""
        nf4_values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844,
                                   -0.1848, -0.0911, 0.0, 0.0911, 0.1848,
                                   0.2844, 0.3949, 0.5251, 0.6962, 1.0, float('inf')])
        block_size = 64
        weight_flat = weight.view(-1)
        quantized_blocks = []
        scale_blocks = []
        for i in range(0, weight_flat.numel(), block_size):
            block = weight_flat[i:i + block_size]
            scale = block.abs().max() / 7  # 4-bit range [-7,7]
            scale_blocks.append(scale)
            normalized = block / scale
            quantized = torch.searchsorted(nf4_values, normalized)
            quantized = torch.clamp(quantized, 0, 15)
            quantized_blocks.append(quantized)
        self.base_weight_4bit = torch.cat(quantized_blocks)
        self.weight_scales = torch.stack(scale_blocks)

    def dequantize_weight(self):
        """Reconstruct FP16 weight from 4-bit representation"""
        nf4_values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844,
                                   -0.1848, -0.0911, 0.0, 0.0911, 0.1848,
                                   0.2844, 0.3949, 0.5251, 0.6962, 1.0, float('inf')])
        block_size = 64
        dequantized_blocks = []
        for i, scale in enumerate(self.weight_scales):
            start = i * block_size
            end = min(start + block_size, self.base_weight_4bit.numel())
            quantized_block = self.base_weight_4bit[start:end]
            dequantized_vals = nf4_values[quantized_block]
            dequantized_blocks.append(dequantized_vals * scale)
        dequantized = torch.cat(dequantized_blocks)
        return dequantized.view(self.in_features, self.out_features)

    def forward(self, x):
        base_weight = self.dequantize_weight()
        base_output = F.linear(x, base_weight.T)
        lora_output = (x @ self.lora_A @ self.lora_B) * self.scaling
        return base_output + lora_output


def seed_quantize(weight: torch.Tensor):
    """Run the article's quantiser on a (out, in) weight; returns (codes int64 (n,), scales (n_blocks,))."""
    out_f, in_f = weight.shape
    layer = QLoRALinear(in_f, out_f)
    layer.quantize_weight(weight.contiguous())
    return layer.base_weight_4bit, layer.weight_scales


def seed_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The article's quantise + dequantise, returned in the article's (in, out) view."""
    out_f, in_f = weight.shape
    layer = QLoRALinear(in_f, out_f)
    layer.quantize_weight(weight.contiguous())
    return layer.dequantize_weight()
