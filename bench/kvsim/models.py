"""Model shapes that set chunk sizes, and a FLOPs model of prefill to value a hit.

Assumptions of the FLOPs model (stated so they can be argued with):
- Prefill of token t (0-based, causal) costs 2*P FLOPs in matmuls against the weights,
  where P counts the weights a token multiplies (all but the input embedding, which is
  a lookup, and the LM head, which prefill applies to the last token only), plus
  4*L*d*t FLOPs of attention (QK^T and AV over the t earlier tokens, d = query heads x
  head dim; grouped-query attention shares K/V heads but not this arithmetic).
- Norms, rotary embeddings, softmax and activations are left out (under 1%).
- A chunk hit of tokens [a, b) saves exactly the prefill of those tokens; recomputing
  them would cost the same FLOPs whatever the batch.
- GPU time avoided is FLOPs / (peak * MFU), with an H100 SXM's dense bf16 peak of
  989 TFLOP/s and an MFU of 0.5, a typical prefill figure; only a reading aid.
"""

from __future__ import annotations

from dataclasses import dataclass

H100_BF16_DENSE_FLOPS = 989e12
PREFILL_MFU = 0.5


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total_params: float
    bytes_per_element: int = 2  # bf16

    @property
    def hidden(self) -> int:
        return self.query_heads * self.head_dim

    @property
    def matmul_params(self) -> float:
        """Weights a prefill token multiplies: all but the input embedding and LM head."""
        return self.total_params - 2 * self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.kv_bytes_per_token * chunk_tokens

    def prefill_flops(self, start_token: int, end_token: int) -> float:
        """FLOPs to prefill tokens [start_token, end_token) after start_token of context."""
        count = end_token - start_token
        positions_sum = (start_token + end_token - 1) * count / 2
        return 2 * self.matmul_params * count + 4 * self.layers * self.hidden * positions_sum


def gpu_seconds(flops: float) -> float:
    return flops / (H100_BF16_DENSE_FLOPS * PREFILL_MFU)


# Shapes from the models' published config.json (Meta Llama 3).
MODELS = {
    "llama-3-8b": Model("Llama-3-8B", 32, 32, 8, 128, 128256, 8.03e9),
    "llama-3-70b": Model("Llama-3-70B", 80, 64, 8, 128, 128256, 70.55e9),
}
