"""How a model runs, apart from what it is: `Layout` (never saved in a checkpoint).

The same architecture (`ModelConfig`) and the same parameters run in several
layouts, chosen per run (Hydra group configs/layout/): scanned or unrolled
layers, fused or separate projections, and the attention kernels. A
checkpoint always holds the canonical layout's parameters (stacked, unfused;
`dllm.models.transformer.canonical_params`); its config.json holds the
architecture only (older checkpoints that also wrote these fields still load:
the fields are ignored).
"""

from __future__ import annotations

import dataclasses

ATTENTION_IMPLS = (None, "xla", "cudnn")
WINDOW_ATTENTION_IMPLS = (None, "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the transformer's parameters are held and its attention is run.

    Attributes:
      scan_layers: run the blocks with `lax.scan` over stacked [layers, ...]
        parameters (fast compile, training) instead of a Python loop over one
        dict per layer (faster decoding on GPU: no per-step slice copies of
        stacked weights; experiments/results/benchmark/README.md).
      scan_unroll: with `scan_layers`, how many layers one iteration of the scan runs
        (`lax.scan(unroll=...)`; >= n_layers unrolls the whole scan, with static slices of the
        stacked parameters). The parameters stay stacked, so checkpoints, initialization and the
        training layout's rules are unchanged; a training-speed knob (issue 25's profile: the
        scanned train step spent 15 ms of 113 in device copies).
      fused_projections: hold q/k/v as one [d, 3, heads, head_dim] parameter
        (multi-head attention; with fewer KV heads one [d, kv_heads, group + 2,
        head_dim]: each KV head's query heads, k and v) and gate/up as one [d, 2, mlp] parameter,
        each applied as one GEMM (MaxText's fused_qkv / fused_mlp). Faster
        decoding at few tokens per step.
      fp8_weights: hold every GEMM weight (q/k/v, attention output, gate/up,
        down, the untied output head) as float8 e4m3 with a float32 scale per
        output column, quantized when the model is built or loaded
        (`dllm.models.quantize`): a GEMM of at most 128 rows whose sizes tile
        (powers of two >= 16) reads the FP8 bytes through a Pallas kernel on a
        GPU; others convert the weight and run XLA's GEMM. Decoding on one
        device only; checkpoints hold the rounded weights in the parameter dtype.
      attention_impl: passed to `jax.nn.dot_product_attention` for full
        forwards ("xla", "cudnn", or None: jax's default, XLA's attention).
      window_attention_impl: the same for cached window steps (a window of
        queries against the KV cache), or "pallas": the split-K Pallas kernel
        of `dllm.models.window_attention`, which also writes the window's K/V
        into the cache. None (default): for steps of at most 64 query rows in
        all (batch x window: the dual cache's block at batch 1), the Pallas
        kernel when the process sees one device and it is a GPU and head_dim
        is a power of two >= 16, else XLA's ("pallas" with a mesh is refused:
        the kernel is not partitioned); for more rows `attention_impl`.
        Measured figures: experiments/results/benchmark/README.md.
    """

    scan_layers: bool = True
    scan_unroll: int = 1
    fused_projections: bool = False
    fp8_weights: bool = False
    attention_impl: str | None = None
    window_attention_impl: str | None = None

    def __post_init__(self):
        for name in ("scan_layers", "fused_projections", "fp8_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Layout.{name}={getattr(self, name)!r}: must be true or false")
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"Layout.scan_unroll={self.scan_unroll!r}: must be an int >= 1 (layers per scan "
                             "iteration)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Layout.attention_impl={self.attention_impl!r}: allowed None, 'xla', 'cudnn'")
        if self.window_attention_impl not in WINDOW_ATTENTION_IMPLS:
            raise ValueError(f"Layout.window_attention_impl={self.window_attention_impl!r}: "
                             "allowed None, 'xla', 'cudnn', 'pallas'")

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)


LAYOUT_FIELDS = tuple(field.name for field in dataclasses.fields(Layout))
CANONICAL = Layout()  # the checkpoints' layout: stacked, unfused
