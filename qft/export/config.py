"""``GPTQConfig``: every knob of the post-fit GPTQ export, validated once, before any work.

The names follow the Hugging Face ``quantization_config`` of GPTQ checkpoints (``bits``, ``group_size``,
``desc_act``, ``sym``, ``true_sequential``, ``damp_percent``) so that what the user asks for is what
``config.json`` says.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .prune import PATTERNS, PRUNE_METHODS, pattern_nm

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("gptq", "rtn", "awq", "awq_gptq", "none")
HESSIAN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class GPTQConfig:
    """How to quantize the merged full-precision model."""

    bits: int = field(default=4, metadata={"help": f"Integer width of the weights; one of {SUPPORTED_BITS}."})
    group_size: int = field(default=128, metadata={
        "help": "Input columns sharing one scale/zero; -1 = one per output row. A size that does not divide "
                "a layer's in_features gives a short last group (valid GPTQ, but gptqmodel's CPU kernels and "
                "vLLM refuse it, so qft warns)."})
    sym: bool = field(default=True, metadata={"help": "Symmetric grid: zero fixed at 2**(bits-1)."})
    desc_act: bool = field(default=False, metadata={
        "help": "Act-order: quantize columns by decreasing Hessian diagonal (activation energy) first."})
    static_groups: bool = field(default=True, metadata={
        "help": "With desc_act, fix each group's scale/zero from the original weights before the solve, so "
                "g_idx stays in natural order (fast kernels need no reordering)."})
    act_group_aware: bool | None = field(default=None, metadata={
        "help": "Group-aware reordering (GAR, arXiv:2505.14638): visit groups by decreasing largest Hessian "
                "diagonal and columns by decreasing diagonal inside each group. Act-order's benefit while "
                "g_idx stays natural, so the checkpoint needs no reordering at inference. None (default) = on "
                "unless desc_act; measured on SmolLM2-135M int4 g128 it cuts WikiText-2 perplexity from 32.8 "
                "to 30.2 at the same speed."})
    true_sequential: bool = field(default=True, metadata={
        "help": "Within a block, quantize layers in execution order and collect each layer's Hessian from "
                "inputs that already went through the quantized layers before it."})
    damp_percent: float = field(default=0.01, metadata={
        "help": "Dampening added to the Hessian diagonal, as a fraction of its mean."})
    damp_auto_increment: float = field(default=0.0025, metadata={
        "help": "Added to damp_percent each time the Cholesky factorisation fails (until it succeeds)."})
    hessian_dtype: str = field(default="auto", metadata={
        "help": f"Precision of the X^T X products: one of {HESSIAN_DTYPES}. 'float32' upcasts the activations "
                "first; 'bfloat16' multiplies bf16 activations as they are (the products are exact, sums are "
                "rounded to bf16 once per 512 tokens and accumulated in fp32), about 2.5x faster on CPUs "
                "with AVX512-BF16 or AMX; 'auto' picks bfloat16 for bf16 activations and float32 otherwise."})
    block_size: int = field(default=128, metadata={"help": "Columns per lazy batch update of the solve."})
    mse: bool = field(default=False, metadata={
        "help": "Grid-search each group's clipping range for the lowest |w - q|^2.4 error (slower, sometimes "
                "better at 2-3 bits)."})
    mse_grid: int = field(default=100, metadata={"help": "Grid points of the clipping search."})
    mse_maxshrink: float = field(default=0.8, metadata={"help": "Largest fraction the range may shrink by."})
    method: str = field(default="gptq", metadata={
        "help": f"One of {METHODS}: 'rtn' is round-to-nearest; 'awq' searches AWQ's per-channel scales and "
                "clipping (qft.export.awq) and rounds, written as an AWQ (GEMM) checkpoint; 'awq_gptq' folds "
                "AWQ's scales, then GPTQ solves, written as GPTQ; 'none' only prunes (sparsity > 0), the weights "
                "stay floating point."})
    sparsity: float = field(default=0.0, metadata={
        "help": "Fraction of each decoder linear's weights set to zero before or while rounding "
                "(qft.export.prune); 0 = no pruning. The 2:4 pattern is 0.5."})
    sparsity_pattern: str = field(default="unstructured", metadata={
        "help": f"One of {PATTERNS}: any weights, or 2 of every 4 consecutive inputs of a row."})
    prune_method: str = field(default="sparsegpt", metadata={
        "help": f"One of {PRUNE_METHODS}: smallest |W|; Wanda's |W| * ||x|| per row; SparseGPT's choice inside the "
                "solve, with its error compensated (and rounding in the same pass unless method='none')."})

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQConfig(bits={self.bits!r}) is unsupported; allowed: {list(SUPPORTED_BITS)} "
                             "(the GPTQ checkpoint format packs these widths).")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or \
                not (self.group_size == -1 or self.group_size >= 1):
            raise ValueError(f"GPTQConfig(group_size={self.group_size!r}): use a positive integer (128, 64, 32) "
                             "or -1 for one scale per output row.")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"GPTQConfig(damp_percent={self.damp_percent!r}) must be in [0, 1); 0.01 is usual.")
        if not 0 < self.damp_auto_increment < 1:
            raise ValueError(f"GPTQConfig(damp_auto_increment={self.damp_auto_increment!r}) must be in (0, 1); "
                             "0.0025 is usual.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQConfig(block_size={self.block_size!r}) must be a positive integer; 128 is usual.")
        self._check_pruning()
        structured_solve = self.sparsity > 0 and self.sparsity_pattern != "unstructured" and \
            self.prune_method == "sparsegpt"
        if self.act_group_aware is None:
            self.act_group_aware = not self.desc_act and not structured_solve
        if structured_solve and (self.act_group_aware or self.desc_act):
            raise ValueError(f"GPTQConfig(sparsity_pattern={self.sparsity_pattern!r}, prune_method='sparsegpt') "
                             "chooses n of every m consecutive columns inside the solve, which must visit columns "
                             "in their natural order: leave desc_act and act_group_aware unset (or False).")
        if self.act_group_aware and self.desc_act:
            raise ValueError("GPTQConfig(desc_act=True, act_group_aware=True): pick one column order; "
                             "act_group_aware keeps g_idx natural, desc_act reorders it (leave act_group_aware "
                             "unset to get whichever desc_act does not ask for).")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"GPTQConfig(hessian_dtype={self.hessian_dtype!r}) is unknown; allowed: "
                             f"{list(HESSIAN_DTYPES)}.")
        if self.method not in METHODS:
            raise ValueError(f"GPTQConfig(method={self.method!r}) is unknown; allowed: {list(METHODS)}.")
        if self.method == "awq" and (self.bits != 4 or self.desc_act):
            raise ValueError(f"GPTQConfig(method='awq', bits={self.bits}, desc_act={self.desc_act}): the AWQ (GEMM) "
                             "checkpoint holds 4-bit weights in natural column order. Use bits=4 without desc_act, "
                             "or method='awq_gptq' (AWQ scales, then GPTQ, written as GPTQ) for other widths.")
        if not isinstance(self.mse_grid, int) or self.mse_grid < 1 or not 0 <= self.mse_maxshrink < 1:
            raise ValueError(f"GPTQConfig(mse_grid={self.mse_grid!r}, mse_maxshrink={self.mse_maxshrink!r}): "
                             "need mse_grid >= 1 and 0 <= mse_maxshrink < 1.")

    @classmethod
    def from_scheme(cls, scheme, **overrides) -> "GPTQConfig":
        """The export config for weights trained against a ``qft.quant.QuantScheme`` (QAT's ``weight``).

        Bits, grouping and symmetry come from the scheme, so what QAT trained against is the grid GPTQ
        solves on and writes; ``overrides`` set the solver's own knobs (damping, ordering, method).
        """
        granularity = getattr(scheme, "granularity", None)
        if granularity not in ("per_group", "per_channel"):
            raise ValueError(f"GPTQConfig.from_scheme(scheme.granularity={granularity!r}): a weight scheme is "
                             "'per_group' or 'per_channel'.")
        clash = sorted({"bits", "group_size", "sym"} & set(overrides))
        if clash:
            raise ValueError(f"GPTQConfig.from_scheme(..., {clash[0]}=...): {clash} come from the scheme; change the "
                             "scheme instead so training and export keep one grid.")
        return cls(bits=scheme.bits, group_size=scheme.group_size if granularity == "per_group" else -1,
                   sym=scheme.symmetric, **overrides)

    def _check_pruning(self) -> None:
        sp = self.sparsity
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0 <= sp < 1:
            raise ValueError(f"GPTQConfig(sparsity={sp!r}): a fraction in [0, 1), e.g. 0.5 (0 = no pruning).")
        if self.sparsity_pattern not in PATTERNS:
            raise ValueError(f"GPTQConfig(sparsity_pattern={self.sparsity_pattern!r}) is unknown; allowed: "
                             f"{list(PATTERNS)}.")
        if self.prune_method not in PRUNE_METHODS:
            raise ValueError(f"GPTQConfig(prune_method={self.prune_method!r}) is unknown; allowed: "
                             f"{list(PRUNE_METHODS)}.")
        nm = pattern_nm(self.sparsity_pattern)
        if nm is not None and sp != nm[0] / nm[1]:
            raise ValueError(f"GPTQConfig(sparsity={sp}, sparsity_pattern={self.sparsity_pattern!r}): the pattern "
                             f"zeroes {nm[0]} of every {nm[1]} weights, so sparsity must be {nm[0] / nm[1]}.")
        if self.method == "none" and sp == 0:
            raise ValueError("GPTQConfig(method='none'): 'none' only prunes; set sparsity > 0, or pick a rounding "
                             "method (gptq, rtn, awq).")
        if sp > 0 and self.awq:
            raise ValueError(f"GPTQConfig(method={self.method!r}, sparsity={sp}): AWQ and pruning are not combined; "
                             "prune with method='gptq' (SparseGPT + GPTQ in one pass), 'rtn' or 'none'.")
        if sp > 0 and self.method == "rtn" and self.prune_method != "magnitude":
            raise ValueError(f"GPTQConfig(method='rtn', prune_method={self.prune_method!r}): RTN reads no calibration "
                             "data, so only magnitude pruning goes with it; use method='gptq' or 'none' for "
                             f"{self.prune_method}.")

    @property
    def pruning(self) -> bool:
        return self.sparsity > 0

    @property
    def awq(self) -> bool:
        """Whether AWQ's scales are searched and folded first (``qft.export.awq``)."""
        return self.method in ("awq", "awq_gptq")

    @property
    def checkpoint_format(self) -> str:
        """``"awq"`` (transformers' AWQ GEMM layout) for ``method="awq"``, ``"dense"`` (floating-point weights
        with their zeros) for ``"none"``, else ``"gptq"``."""
        return {"awq": "awq", "none": "dense"}.get(self.method, "gptq")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        return asdict(self)
