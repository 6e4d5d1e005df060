"""The compression-technique contract and its registry.

A technique (quantization, pruning, low rank, ...) is one module: a frozen, versioned config dataclass
(what a plan stores per layer) and a :class:`Technique` subclass that owns every stage of it, registered
with :func:`register`. Nothing else in autocomp names a technique: the search space reads its option
labels, the size model its :meth:`Technique.stored` arithmetic, the proxy its :meth:`Technique.apply`,
``train`` its trainable form, ``export``/``load`` its :meth:`Technique.pack`/:meth:`Technique.unpack`,
the latency model its :meth:`Technique.execution` and the runtime its lowering. Adding one is its file
plus one registration line (or an ``autocomp.techniques`` entry point for a separate package).

How techniques compose. A layer's weight is viewed as a float32 matrix (outputs x inputs), already cut
by the plan's structured groups, and carried through the layer's techniques in ascending :attr:`order`
as a list of :class:`Part` s. A plain weight is one part; a ``factor`` technique (low rank) may turn it
into several (``B @ A``); ``sparsify`` techniques (pruning) attach masks; an ``encode`` technique
(quantization) stores the values in fewer bits. At most one technique per :attr:`stage` acts on a layer.

Contract (every method is called only for a config of this technique; "parts" are the outputs of the
techniques with a lower ``order``):

* :meth:`parse` / :meth:`bind` -- a search-space label becomes an option, and an option becomes this
  layer's config given the stored shapes the earlier techniques leave (``None``: not applicable there;
  the space then drops the option for that layer). :attr:`neutral` is the label meaning "not applied".
* :meth:`stored` -- exact arithmetic: how the stored matrices (:class:`Stored`) change. It must count
  every byte :meth:`pack` writes; ``tests/test_techniques.py`` checks the two agree for every
  registered technique.
* :meth:`apply` -- the proxy's transform. It must not modify its input tensors (they may be the model's
  own weights or cached values), must be deterministic, and may cache expensive layer-only work in
  ``ctx.cache`` under a key that includes ``ctx.name``, ``ctx.structured_key`` and ``ctx.upstream``.
* :meth:`train_setup` / :meth:`train_transform` / :meth:`train_prepare` -- the trainable form. At step
  0 it must compute exactly what :meth:`apply` computes (the untrained student equals the proxy).
* :meth:`pack` / :meth:`unpack` -- the packed format (docs/FORMAT.md); ``unpack(pack(x))`` equals
  :func:`reconstruct` of the parts bit for bit.
* :meth:`execution` -- how the layer runs on a device (latency, BitOps): default unchanged (dense).
* :meth:`runtime_linear` / :meth:`runtime_graph` -- real kernels for ``autocomp hardware validate``.
* :meth:`onnx_weight` / :meth:`onnx_kernel` -- optional: the ONNX Runtime kernel a part goes to in
  ``export --format onnx`` (:class:`OnnxWeight`, e.g. ``MatMulNBits`` on the part's own codes; default
  dense float32), and whether the file stores an option exactly as planned (``--hardware ort-cpu``
  searches only those).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Mapping

from autocomp.errors import AutocompError

__all__ = ["Part", "OnnxWeight", "Stored", "Execution", "LayerContext", "TechniqueConfig", "Technique", "register", "registered",
           "technique", "axes", "by_dim", "ceil8", "has_statistics", "option_of", "unregister", "STAGES"]

STAGES = ("factor", "sparsify", "encode")


@dataclass(frozen=True)
class Part:
    """One stored matrix. ``values`` is what the runtime multiplies with (already decoded); the integer
    ``codes``/``scale``/``zero_point`` (or a technique's own ``extra`` arrays) are kept for the export."""

    values: Any  # torch.Tensor [rows, cols] float32
    mask: Any = None  # torch.Tensor bool [rows, cols], True = kept; None = dense
    nm: bool = False  # mask follows the 2:4 pattern
    codes: Any = None  # torch.Tensor int32, unsigned codes in [0, 2**bits)
    scale: Any = None  # torch.Tensor float16 [rows, n_groups]
    zero_point: Any = None  # torch.Tensor int32 [rows, n_groups] or None (symmetric)
    extra: Mapping[str, Any] = field(default_factory=dict)  # a plug-in technique's own stored arrays

    def evolve(self, **changes: Any) -> "Part":
        return replace(self, **changes)


@dataclass(frozen=True)
class Stored:
    """One stored matrix as the size model sees it: ``nnz`` values of ``value_bits`` each, plus
    ``meta_bytes`` of whole arrays (masks, indices, scales, zero points, codebooks)."""

    rows: int
    cols: int
    nnz: int
    value_bits: int
    meta_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return (self.nnz * self.value_bits + 7) // 8 + self.meta_bytes


@dataclass(frozen=True)
class Execution:
    """How one layer runs on a device: its matmuls ``(k, n)`` (inputs, outputs), the compute dtype, the
    weight bits read from memory, speed-up and density factors, and the BitOps operand widths."""

    shapes: tuple[tuple[int, int], ...]
    dtype: str
    read_bits: float  # weight bits per value the kernel reads
    store_bits: float  # weight bits per value for BitOps (what the plan stores)
    act_bits: int = 32
    speed: float = 1.0  # compute-time factor (2:4 kernels: 1 / speed-up)
    density: float = 1.0  # weight-bytes factor
    kernel: str = "dense"  # the latency class: dense | int8 (a calibrated device fits one correction per class)


@dataclass
class LayerContext:
    """Where a technique is working, and a cache shared across trials for this evaluator."""

    name: str
    structured_key: tuple[int, ...] = ()
    cache: dict[Any, Any] = field(default_factory=dict)
    upstream: tuple[Any, ...] = ()  # the configs already applied to this layer (lower order)
    stats: Any = None  # CalibrationStats (compensated options read the layer's input second moment), or None
    cols: Any = None  # the kept input columns of a structurally cut layer (indexes the statistics), or None
    holder: Any = None  # a trained layer's parametrization (compensated options keep their fixed grid / mask)
    index: int = 0  # the position of ``parts[0]`` among the layer's stored matrices (with ``holder``)
    width: int | None = None  # the layer's input columns (an identity statistic for a tied table)
    # other choices (LayerPlans) of this layer the caller expects to ask for, one at a time (a search's space
    # options): a technique may compute them together and leave them in ``cache`` (:meth:`with_peers`)
    peers: tuple[Any, ...] = ()

    def with_peers(self, tag: str, config: Any, like: Callable[[Any], bool],
                   compute: Callable[[list[Any]], list[Any]]) -> Any:
        """``config``'s result on this layer's plain matrix, computed together with the single-step peers of the
        same config type that ``like`` accepts and that are not cached yet: ``compute(configs)`` returns one
        result per config (the first is ``config``'s); the others wait in ``cache`` until asked for, and each
        is taken out once used."""

        def key(cfg: Any) -> tuple[Any, ...]:
            return (tag, self.name, self.structured_key, cfg)

        take = getattr(self.cache, "take", None)
        hit = take(key(config)) if take is not None else self.cache.pop(key(config), None)
        if hit is not None:
            return hit
        others: list[Any] = []
        for peer in self.peers:
            steps = peer.steps()
            if len(steps) != 1 or type(steps[0][1]) is not type(config):
                continue
            q = steps[0][1]
            if like(q) and q != config and q not in others and key(q) not in self.cache:
                others.append(q)
        results = compute([config, *others])
        for q, r in zip(others, results[1:]):
            self.cache[key(q)] = r
        return results[0]

    def hessian(self) -> Any:
        """The input second moment of this layer (float64, cut to the kept columns); a clear error if the
        model has no calibration statistics attached."""
        from autocomp.errors import AutocompError

        if self.stats is None:
            raise AutocompError(f"layer {self.name}: compensated options (GPTQ / SparseGPT / activation-aware low rank) "
                                f"need calibration statistics: search, train, export and evaluate gather them "
                                f"from --data; in Python call autocomp.calibrate(model, batches) first")
        return self.stats.hessian(self.name, self.cols, self.width)

    def inverse_cholesky(self) -> Any:
        """The upper Cholesky factor of this layer's dampened inverse second moment, computed once per layer
        and structured cut (every GPTQ / SparseGPT option of the layer shares it)."""
        from autocomp.compressors.compensate import inverse_cholesky

        key = ("hinv", self.name, self.structured_key)
        u = self.cache.get(key)
        if u is None:
            u = self.cache[key] = inverse_cholesky(self.hessian())
        return u

    def act_order(self) -> tuple[Any, Any]:
        """(GPTQ's act order of this layer's columns, the inverse Cholesky factor of the reordered second
        moment), computed once per layer and structured cut."""
        from autocomp.compressors.compensate import act_order, inverse_cholesky

        key = ("act-order", self.name, self.structured_key)
        hit = self.cache.get(key)
        if hit is None:
            h = self.hessian()
            order = act_order(h)
            hit = self.cache[key] = (order, inverse_cholesky(h[order][:, order]))
        return hit


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique's per-layer config: a frozen dataclass, stored in plans as its fields.
    Subclasses set ``technique`` (the registered name) and bump ``VERSION`` when the fields change."""

    technique: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    ADDED: ClassVar[dict[str, tuple[Any, int]]] = {}  # field -> (its default, the version that added it)

    def to_dict(self) -> dict[str, Any]:
        """Its fields; a field left at a default that a later version added is not written, so plans that
        do not use it stay readable by the autocomp that wrote version 1. (Made once per config -- it is
        frozen -- and copied: every trial writes its plan, and ``asdict`` was ~3 ms of a MiniLM trial's loop.)"""
        d = self.__dict__.get("_as_dict")
        if d is None:
            d = asdict(self)
            for name, (default, _) in self.ADDED.items():
                if d.get(name) == default:
                    d.pop(name, None)
            object.__setattr__(self, "_as_dict", d)
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in d.items()}

    def version(self) -> int:
        """The lowest config version that can hold this config (see :attr:`ADDED`)."""
        v = 1
        for name, (default, since) in self.ADDED.items():
            if getattr(self, name) != default:
                v = max(v, since)
        return v

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> "TechniqueConfig":
        if not isinstance(d, Mapping):
            raise AutocompError(f"{where}: {cls.technique} config must be a mapping of its fields")
        allowed = [f.name for f in fields(cls)]
        bad = sorted(set(d) - set(allowed))
        if bad:
            raise AutocompError(f"{where}: {cls.technique} has no field {bad[0]!r}; allowed: {', '.join(allowed)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise AutocompError(f"{where}: {cls.technique}: {e}") from None

    def label(self) -> str:
        return technique(self.technique).label(self)


class Technique(ABC):
    """One compression technique. See the module docstring for the contract of each method."""

    name: ClassVar[str]  # registered name; the key of its config in plans
    order: ClassVar[int]  # position in the per-layer pipeline (lower first)
    stage: ClassVar[str]  # "factor" | "sparsify" | "encode": at most one technique per stage on a layer
    config: ClassVar[type[TechniqueConfig]]
    axis: ClassVar[str]  # the search-space rule key offering its options (e.g. "quant")
    dim: ClassVar[str]  # the suffix of its Optuna parameters ("<layer or tie key>:<dim>")
    neutral: ClassVar[str]  # the option label meaning "not applied"
    title: ClassVar[str] = ""  # how plan summaries name it ("pruned", "low-rank")
    row_local: ClassVar[bool] = False  # output row i depends only on input row i (of part 0)
    reference_axis: ClassVar[bool] = False  # its options define the uniform reference plans of a study
    # the axis of another technique of the same stage whose rules may list this one's labels too, as
    # alternatives of one choice (codebooks beside scalar grids on ``quant``); see :func:`option_of`
    shares_axis: ClassVar[str | None] = None

    # -- options ------------------------------------------------------------------------------------------
    @abstractmethod
    def parse(self, label: str) -> Any:
        """A label -> a hashable option, ``None`` for :attr:`neutral`; ``ValueError`` naming the grammar
        for anything else."""

    @abstractmethod
    def bind(self, option: Any, layer: Any, shapes: list[tuple[int, int]]) -> TechniqueConfig | None:
        """The config ``option`` means for ``layer`` (a :class:`~autocomp.desc.LayerDesc`) whose stored
        matrices have ``shapes`` after the earlier techniques; ``None`` where it does not apply."""

    def label(self, config: Any) -> str:
        """A short label for people and option lists (``4g128``, ``u50``, ``r96``)."""
        return self.name

    def brief(self, config: Any) -> str:
        """What plan summaries count (``4b``, ``u50``); ``""`` counts the layers only."""
        return self.label(config)

    def summary(self, config: Any) -> dict[str, float]:
        """Plain figures for constraints and reports: any of ``bits`` (per stored weight), ``sparsity``
        (fraction of entries removed) and ``rank``."""
        return {}

    def from_v1(self, fields: Mapping[str, Any]) -> TechniqueConfig | None:
        """Built-in techniques: this technique's config from a version-1 plan's fixed layer fields."""
        return None

    def to_v1(self, config: Any) -> dict[str, Any] | None:
        """Built-in techniques: the version-1 fields for ``config`` (plan keys stay those of v1)."""
        return None

    def calibrated(self, config: Any) -> bool:
        """Whether ``config`` needs the layer's calibration statistics (an error-compensating method)."""
        return False

    def calibrated_option(self, option: Any) -> bool:
        """The same for a parsed option (before it is bound to a layer)."""
        return False

    def fixed_start(self, config: Any) -> bool:
        """Whether the trainable form must start from the proxy's own result for this config (and keep what
        :meth:`train_setup` reads from ``options["parts"]``): compensated or searched weights that a plain
        transform of the weights cannot reproduce."""
        return self.calibrated(config)

    def check(self, config: Any, layer: Any, shapes: list[tuple[int, int]]) -> None:
        """Raise :class:`AutocompError` if ``config`` cannot be stored for this layer (a hand-edited plan)."""

    # -- bytes --------------------------------------------------------------------------------------------
    @abstractmethod
    def stored(self, config: Any, stored: list[Stored]) -> list[Stored]:
        """How this technique changes the stored matrices (exact bytes of what :meth:`pack` writes)."""

    # -- proxy --------------------------------------------------------------------------------------------
    @abstractmethod
    def apply(self, parts: list[Part], config: Any, ctx: LayerContext) -> list[Part]:
        """The compressed parts (new tensors; inputs untouched)."""

    def input_hook(self, config: Any) -> Any:
        """A ``forward_pre_hook`` applied to the layer's inputs (W8A8 activation quantization), or None."""
        return None

    # -- training -----------------------------------------------------------------------------------------
    def train_latent(self, config: Any, sub: Any) -> list[Any] | None:
        """``factor`` techniques: the initial trainable matrices that replace the weight (e.g. ``[B, A]``)."""
        return None

    def train_setup(self, config: Any, holder: Any, latents: list[Any], options: Mapping[str, Any]) -> None:
        """Register this technique's buffers / parameters on ``holder`` (names prefixed by its own)."""

    def train_prepare(self, config: Any, holder: Any, i: int, v: Any) -> Any:
        """Differentiable transform of stored matrix ``i`` kept by the export (masks, clipping)."""
        return v

    def train_mask(self, config: Any, holder: Any, i: int) -> Any:
        """``sparsify`` techniques: the current keep-mask of stored matrix ``i`` (what ``apply`` hands on)."""
        return None

    def train_transform(self, config: Any, holder: Any, i: int, v: Any, mask: Any = None) -> Any:
        """What training computes for stored matrix ``i`` (``mask``: the upstream keep-mask, or None):
        :meth:`train_prepare`, and for ``encode`` techniques a straight-through estimate of :meth:`apply`
        (default: the real transform forward, identity backward)."""
        v = self.train_prepare(config, holder, i, v)
        if self.stage != "encode":
            return v
        out = self.apply([Part(values=v.detach(), mask=mask)], config, LayerContext(f"train.{self.name}"))[0]
        deq = out.values if out.mask is None else out.values * out.mask
        return v + (deq - v).detach()

    def train_start(self, config: Any, holder: Any, latents: list[Any], masks: list[Any],
                    options: Mapping[str, Any]) -> list[Any] | None:
        """Before the first step of a fresh run: new values for the latent matrices (e.g. clipped
        quantization ranges), or None to leave them."""
        return None

    def train_progress(self, config: Any, holder: Any, latents: list[Any], frac: float) -> None:
        """Schedules: called as training advances (``frac`` in 0..1)."""

    def train_param_lr(self, param_name: str) -> float | None:
        """Learning-rate multiplier for a parameter this technique registered (None: the weights' lr)."""
        return None

    def train_after_step(self, holder: Any) -> None:
        """Projection after each optimizer step (e.g. clamping learned ranges)."""

    # -- export -------------------------------------------------------------------------------------------
    def pack(self, config: Any, part: Part, key: str, out: dict[str, Any], state: dict[str, Any]) -> None:
        """Write this technique's arrays for one part into ``out`` (numpy, keyed ``{key}.<name>``).
        ``state["selection"]`` is the boolean mask of stored entries (sparsify); an ``encode`` technique
        writes the values and sets ``state["encoded"]``."""

    def unpack(self, config: Any, arrays: Mapping[str, Any], key: str, rows: int, cols: int,
               state: dict[str, Any]) -> None:
        """Inverse of :meth:`pack`: read ``state["mask"]`` (sparsify) or set ``state["values"]`` (the
        dense float32 matrix, encode)."""

    def part_names(self, config: Any) -> list[str] | None:
        """``factor`` techniques: the array-name suffixes of the parts (``["B", "A"]``)."""
        return None

    # -- hardware -----------------------------------------------------------------------------------------
    def execution(self, config: Any, ex: Execution, device: Any) -> Execution:
        """How the layer runs on ``device`` (None: autocomp's own runtime on this CPU)."""
        return ex

    def runtime_linear(self, config: Any, part: Part, bias: Any) -> Any:
        """A real kernel (``torch.nn.Module``) computing ``x @ part.T + bias``, or None (dense fp32)."""
        return None

    def runtime_graph(self, config: Any, parts: list[Part], bias: Any, linear: Any) -> Any:
        """``factor`` techniques: the module for several parts, each built with ``linear(part, bias)``."""
        return None

    # -- ONNX (autocomp export --format onnx) -------------------------------------------------------------
    def onnx_kernel(self, config: Any) -> str | None:
        """The ONNX Runtime kernel class a layer with this option runs on when the export stores it exactly as
        the plan's format does (``--hardware ort-cpu`` searches only such options), or None: the export would
        store it otherwise (e.g. sparsity as dense zeros), so the predicted bytes would not be the file's."""
        return None

    def ort_label(self, label: str) -> str:
        """The option a search for ONNX Runtime (``--hardware ort-cpu``) uses in place of ``label``: one whose
        simulation computes what the ORT kernel does (W8A8: ``int8`` -> ``int8f``, ORT's full 8-bit activation
        grid). Most options run the same everywhere: ``label`` itself."""
        return label

    def onnx_weight(self, config: Any, part: Part, use: str) -> "OnnxWeight | None":
        """How the ONNX export stores ``part`` when the graph ``use``\ s it as a ``"matmul"`` weight or a
        ``"gather"`` table: an :class:`OnnxWeight` (integer codes an ONNX Runtime kernel runs as stored), or
        None (dense float32, values as decoded: a pruned entry is a stored zero). Structure (cut rows,
        factors) is lowered by the runtime model before export (:meth:`runtime_graph`)."""
        return None


@dataclass(frozen=True)
class OnnxWeight:
    """One matrix as an ONNX Runtime integer kernel stores it. ``op``: ``MatMulNBits`` (com.microsoft;
    weight-only, 2/4/8-bit codes in blocks of ``block`` inputs), ``MatMulInteger`` (W8A8: int8 weights per
    row, activations quantized per tensor at run time), ``GatherBlockQuantized`` (com.microsoft; an
    embedding table gathered from its codes) or ``Codebook`` (no kernel: ``codes`` are indices into the
    rows of ``scales``, a ``[k, block]`` float16 codebook, each index ``bits`` wide and decoding ``block``
    consecutive weights of its row; the graph decodes them). ``codes``: unsigned integers ``[rows, cols]`` (int8 for
    MatMulInteger); ``scales``: float32 ``[rows, ceil(cols / block)]`` (``[rows]`` for MatMulInteger);
    ``zero_points``: like ``scales``, integers, or None (the kernel's default ``2^(bits-1)``). ``note``:
    what differs from the plan's own format (e.g. 3-bit codes in 4-bit containers), or "". ``act_grid``
    (MatMulInteger): the activations' largest code, 255 (ORT's ``DynamicQuantizeLinear``) or 127 (7 bits,
    quantized by the graph itself, as torch's x86 kernel does)."""

    op: str
    bits: int
    block: int
    codes: Any
    scales: Any
    zero_points: Any = None
    note: str = ""
    act_grid: int = 255
    mask: Any = None  # Codebook: bool [rows, cols], the kept positions (a pruned layer), stored as a bitmap


_REGISTRY: dict[str, Technique] = {}
_ORDERED: list[Technique] = []  # pipeline order, rebuilt on every (un)registration: read on hot paths
_LOADED = False


def _reorder() -> None:
    _ORDERED[:] = sorted(_REGISTRY.values(), key=lambda t: t.order)


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique available to plans, spaces and every stage, by its name."""
    for attr in ("name", "order", "stage", "config", "axis", "dim", "neutral"):
        if not hasattr(cls, attr):
            raise TypeError(f"technique {cls.__name__} must define {attr!r}")
    if cls.stage not in STAGES:
        raise TypeError(f"technique {cls.name}: stage must be one of {STAGES}, got {cls.stage!r}")
    if cls.config.technique != cls.name:
        raise TypeError(f"technique {cls.name}: its config class must set technique = {cls.name!r}")
    for other in _REGISTRY.values():
        if other.name != cls.name and (other.dim == cls.dim or other.axis == cls.axis):
            raise TypeError(f"technique {cls.name}: axis {cls.axis!r} / dim {cls.dim!r} taken by {other.name}")
    _REGISTRY[cls.name] = cls()
    _reorder()
    return cls


def unregister(name: str) -> None:
    """Remove a technique (tests of plug-ins; plans naming it then fail to load with a clear error)."""
    _REGISTRY.pop(name, None)
    _reorder()


def _load_builtins() -> None:
    """The built-in techniques (one import line each) and ``autocomp.techniques`` entry points."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import autocomp.compressors.builtin  # noqa: F401 - registers quantize, prune, lowrank

    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="autocomp.techniques"):
            ep.load()
    except Exception as e:  # a broken plug-in package must not take the built-ins down
        raise AutocompError(f"a technique plug-in failed to load ({type(e).__name__}: {e}); fix or uninstall it") from None


def registered() -> list[Technique]:
    """Every technique, in pipeline order."""
    if not _LOADED:
        _load_builtins()
    return _ORDERED


def axes() -> list[Technique]:
    """Every technique in the order its search-space axis was registered (the Optuna parameter order)."""
    _load_builtins()
    return list(_REGISTRY.values())


def technique(name: str) -> Technique:
    if not _LOADED:
        _load_builtins()
    t = _REGISTRY.get(name)
    if t is None:
        raise AutocompError(f"technique {name!r} is not registered here (known: {', '.join(sorted(_REGISTRY))}); "
                            f"install or import the package that defines it")
    return t


def by_dim(dim: str) -> Technique | None:
    _load_builtins()
    return next((t for t in _REGISTRY.values() if t.dim == dim), None)


def option_of(t: Technique, label: str) -> tuple[Technique, Any]:
    """(the technique ``label`` means on ``t``'s axis, its parsed option): ``t`` itself, or else a technique
    of ``t``'s stage that shares its axis (:attr:`Technique.shares_axis`) and parses ``label`` to an option
    (its neutral label is not one). A label none parses raises ``t``'s ``ValueError``, followed by each
    sharing technique's (so the message names every grammar the axis accepts, and a codebook label's own
    mistake: ``vq4x100`` is not a power of 2)."""
    try:
        return t, t.parse(label)
    except ValueError as own:
        reasons = [str(own)]
        for other in _ORDERED:
            if other.shares_axis == t.axis and other.stage == t.stage and other is not t:
                try:
                    option = other.parse(label)
                except ValueError as e:
                    reasons.append(f"as a {other.name} option: {e}")
                    continue
                if option is not None:
                    return other, option
                reasons.append(f"as a {other.name} option: {label!r} is its neutral label, not an option")
        raise ValueError("; ".join(reasons)) from None


def has_statistics(layer: Any) -> bool:
    """Whether calibration statistics exist for a layer (:mod:`~.calibration`): not for a grouped convolution
    (not one matrix). An embedding table's are output-side (the same columns)."""
    return getattr(layer, "groups", 1) == 1


def ceil8(bits: int) -> int:
    return (bits + 7) // 8
