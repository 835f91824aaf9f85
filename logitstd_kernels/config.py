"""``DistillConfig``: every setting of the distillation losses, validated and documented once.

The public functions (``logitstd_kd_loss``, ``distillation_loss``, ``fused_linear_distillation_loss``,
the vocabulary-parallel functions) and the modules take flat keywords, the convention of
``torch.nn.functional`` and Liger-Kernel; each builds one :class:`DistillConfig`, which checks every
value (a bad one raises ``TypeError`` / ``ValueError`` naming the argument) and travels through the
package as one object. The ``torch.library`` ops take flat arguments: :meth:`DistillConfig.op_args`
and :meth:`DistillConfig.from_op_args` are the one place where the object becomes that tuple and back.

Adding a setting: a field here (with its check and its entry in ``KEYWORD_DOCS``), its place in
``OP_FIELDS`` (and so in the op schemas, ``_ops/loss_op.py``), and the kernels that use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Callable, NamedTuple, Optional, TypeVar

import torch

__all__ = ["DistillConfig", "REDUCTIONS", "KD_REDUCTIONS", "BACKENDS", "OBJECTIVE_SETTINGS", "KD_SETTINGS",
           "DKD_SETTINGS", "dkd_config", "LABEL_DIVERGENCES", "OP_FIELDS",
           "KEYWORD_DOCS", "document", "settings_keywords", "config_from", "check_backend", "check_temperature",
           "check_std_args", "check_weight", "check_chunk_size", "check_accum_dtype", "LogitTransforms", "LOGIT_TRANSFORMS",
           "check_logit_transforms", "SUPPORTS", "SPARSE_OP_FIELDS", "op_schema_sparse"]

#: The reductions of the objective: per row, summed, or the sum over the included rows divided by
#: their count ("mean": token-level averaging; "batchmean" for a classification batch), or by their
#: count times V ("class_mean", ``F.kl_div``'s "mean").
REDUCTIONS = ("none", "sum", "mean", "class_mean")
#: ``logitstd_kd_loss``'s reductions, named as ``F.kl_div`` names them, and the config's for each.
KD_REDUCTIONS = {"none": "none", "sum": "sum", "batchmean": "mean", "mean": "class_mean"}
#: The reductions of ``distillation_loss`` and the modules, and of the fused lm_head (whose gradients
#: are computed in the forward, for a scalar loss).
OBJECTIVE_REDUCTIONS = ("none", "sum", "mean")
FUSED_LINEAR_REDUCTIONS = ("sum", "mean")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# SymFloat / SymInt: a temperature torch.compile made dynamic (the checks only compare, so they trace).
_REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def _number(name: str, value: object, what: str = "a number") -> None:
    if isinstance(value, bool) or not isinstance(value, _REAL):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def check_temperature(name: str, value: object) -> float:
    """A finite, strictly positive number."""
    _number(name, value, "a positive number")
    if not (0.0 < value < math.inf):  # False for NaN too
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def split_temperature(settings: dict, caller: str) -> tuple[dict, Optional[torch.Tensor]]:
    """``(settings, tensor)``: a tensor ``temperature`` (learnable, e.g. CTKD's) taken out of the keyword
    settings (the config then holds 1.0 in its place), else ``(settings, None)``. The tensor is
    floating, 0-dim or of the logits' leading shape, for the student and the teacher both
    (``teacher_temperature`` must then be None); its values are checked > 0 where they live on the CPU."""
    tau = settings.get("temperature")
    if not isinstance(tau, torch.Tensor):
        return settings, None
    if not tau.is_floating_point():
        raise TypeError(f"{caller}: temperature must be a float or a floating tensor, got {tau.dtype}")
    if settings.get("teacher_temperature") is not None:
        raise ValueError(f"{caller}: a tensor temperature is the student's and the teacher's: leave "
                         "teacher_temperature None")
    if tau.device.type == "cpu" and not bool(((tau > 0) & torch.isfinite(tau)).all()):
        raise ValueError(f"{caller}: temperature must be finite and > 0 everywhere")
    return {**settings, "temperature": 1.0}, tau


def check_weight(name: str, value: object) -> float:
    """A finite number >= 0."""
    _number(name, value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _check_correction(correction: object) -> int:
    if isinstance(correction, bool) or not isinstance(correction, numbers.Integral):
        raise TypeError(f"correction must be an int (1 = torch.std default, 0 = Algorithm 1), got {correction!r}")
    if correction < 0:
        raise ValueError(f"correction must be >= 0, got {correction}")
    return int(correction)


def _check_eps(eps: object) -> float:
    _number("eps", eps)
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_std_args(num_classes: int, correction: object, eps: object, *, name: str = "logits") -> tuple[int, float]:
    """``correction`` a non-negative int below the class count of ``name``; ``eps`` finite and >= 0."""
    correction, eps = _check_correction(correction), _check_eps(eps)
    _check_classes(num_classes, correction, name)
    return correction, eps


def _check_classes(num_classes: int, correction: int, name: str) -> None:
    if num_classes < 2:
        where = " (rows)" if name.endswith("_weight") else " in its last dimension"
        raise ValueError(f"{name} has {num_classes} class(es){where}; standardization needs at least 2")
    if num_classes - correction <= 0:
        raise ValueError(f"correction={correction} leaves no degrees of freedom for {num_classes} classes "
                         f"(needs correction < number of classes)")


def kd_reduction(reduction: object) -> str:
    """The config's reduction for ``logitstd_kd_loss``'s (``F.kl_div``'s names)."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(KD_REDUCTIONS)}, got {reduction!r}")
    return KD_REDUCTIONS[reduction]  # type: ignore[index]


def objective_reduction(reduction: object, choices: tuple[str, ...] = OBJECTIVE_REDUCTIONS) -> str:
    """``reduction`` when it is one of ``choices`` (the objective's names are the config's)."""
    if reduction not in choices:
        raise ValueError(f"reduction must be one of {choices}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_backend(backend: object, choices: tuple[str, ...] = BACKENDS) -> str:
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_chunk_size(chunk_size: object) -> Optional[int]:
    """A positive int, or None (the default rule)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return None if chunk_size is None else int(chunk_size)


def check_accum_dtype(accum_dtype: object) -> Optional[torch.dtype]:
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"accum_dtype must be a floating dtype or None, got {accum_dtype!r}")
    return accum_dtype  # type: ignore[return-value]


class LogitTransforms(NamedTuple):
    """The fused lm_head's transforms of each chunk's logits before the objective, TRL's keywords
    (``DistillationTrainer``): ``z = logits * logit_scale`` (Cohere's ``logit_scale``), then
    ``z = c * tanh(z / c)`` with ``c = final_logit_softcapping`` (Gemma 2/3), for the student and the
    teacher apart; the objective's standardization and temperatures follow. They belong to the lm_head
    functions, not to :class:`DistillConfig`: the kernels never see them (the chunk loop applies them)."""

    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_final_logit_softcapping: Optional[float] = None
    teacher_final_logit_softcapping: Optional[float] = None

    def student(self) -> tuple[float, Optional[float]]:
        """``(scale, softcap)`` of the student's logits."""
        return self.student_logit_scale, self.student_final_logit_softcapping

    def teacher(self) -> tuple[float, Optional[float]]:
        """``(scale, softcap)`` of the teacher's logits."""
        return self.teacher_logit_scale, self.teacher_final_logit_softcapping


#: The keywords of :class:`LogitTransforms`, as the fused lm_head functions take them.
LOGIT_TRANSFORMS = LogitTransforms._fields


def check_logit_transforms(student_logit_scale: object = 1.0, teacher_logit_scale: object = 1.0,
                           student_final_logit_softcapping: object = None,
                           teacher_final_logit_softcapping: object = None) -> LogitTransforms:
    """The scales finite and > 0, each softcap None or finite and > 0 (``TypeError`` / ``ValueError``
    naming the argument)."""
    caps = {"student_final_logit_softcapping": student_final_logit_softcapping,
            "teacher_final_logit_softcapping": teacher_final_logit_softcapping}
    return LogitTransforms(check_temperature("student_logit_scale", student_logit_scale),
                           check_temperature("teacher_logit_scale", teacher_logit_scale),
                           *(None if value is None else check_temperature(name, value) for name, value in caps.items()))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The settings of the distillation objective, ``ce_weight * CE + kd_weight * tau_s**2 * KL``.

    Equivalent eager code: ``reference.distillation_loss(student, teacher, labels, **dataclasses.asdict(config))``
    (with ``reduction="class_mean"`` for ``F.kl_div``'s "mean"). The defaults are the paper's official
    code (CE weight 0.1, KD weight 9, base temperature 2, ``torch.std``'s correction, ``eps=1e-7``).
    Every value is checked when the object is made; ``teacher_temperature`` None becomes ``temperature``.
    """

    temperature: float = 2.0
    teacher_temperature: Optional[float] = None
    standardize: bool = True
    correction: int = 1
    eps: float = 1e-7
    ignore_index: int = -100
    label_smoothing: float = 0.0
    ce_weight: float = 0.1
    kd_weight: float = 9.0
    reduction: str = "mean"
    divergence: str = "forward_kl"
    beta: float = 0.5
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    support: str = "renormalize"
    generation_temperature: float = 1.0

    def __post_init__(self) -> None:
        tau_s = check_temperature("temperature", self.temperature)
        tau_t = tau_s if self.teacher_temperature is None else check_temperature("teacher_temperature",
                                                                                 self.teacher_temperature)
        if not isinstance(self.standardize, (bool, int)):
            raise TypeError(f"standardize must be a bool, got {type(self.standardize).__name__}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        _number("label_smoothing", self.label_smoothing)
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.divergence not in DIVERGENCES + LABEL_DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES + LABEL_DIVERGENCES}, got {self.divergence!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        _number("beta", self.beta)
        if not (0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        values = dict(temperature=tau_s, teacher_temperature=tau_t, standardize=bool(self.standardize),
                      correction=_check_correction(self.correction), eps=_check_eps(self.eps),
                      ignore_index=int(self.ignore_index), label_smoothing=float(self.label_smoothing),
                      ce_weight=check_weight("ce_weight", self.ce_weight),
                      kd_weight=check_weight("kd_weight", self.kd_weight), beta=float(self.beta),
                      dkd_alpha=check_weight("dkd_alpha", self.dkd_alpha),
                      dkd_beta=check_weight("dkd_beta", self.dkd_beta),
                      generation_temperature=check_temperature("generation_temperature", self.generation_temperature))
        for name, value in values.items():  # canonical Python types (a frozen dataclass: set them directly)
            object.__setattr__(self, name, value)

    def check_classes(self, num_classes: int, name: str = "student_logits") -> None:
        """The class count ``num_classes`` of ``name`` allows the standardization (V >= 2, correction < V)."""
        if self.standardize:
            _check_classes(num_classes, self.correction, name)

    def replace(self, **changes: object) -> "DistillConfig":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def op_args(self) -> tuple:
        """The flat settings the ``torch.library`` ops take in their positional part, in ``OP_FIELDS`` order."""
        return tuple(getattr(self, name) for name in OP_FIELDS)

    def op_tail_args(self) -> tuple:
        """The flat settings the ops take at their end, with defaults, in ``OP_TAIL_FIELDS`` order."""
        return tuple(getattr(self, name) for name in OP_TAIL_FIELDS)

    @classmethod
    def from_op_args(cls, *values: object, tail: tuple = (), reduction: str = "mean", validate: bool = True,
                     sparse: tuple = ()) -> "DistillConfig":
        """The inverse of :meth:`op_args` (``values``), :meth:`op_tail_args` (``tail``, which may stop
        early: the rest take their defaults) and :meth:`sparse_op_args` (``sparse``, likewise).
        ``validate=False`` skips the checks: for values that came from a checked config (the op called by
        the package's own functions)."""
        fields = dict(zip(OP_FIELDS, values), **dict(zip(OP_TAIL_FIELDS, tail)), **dict(zip(SPARSE_OP_FIELDS, sparse)),
                      reduction=reduction)
        if validate:
            return cls(**fields)
        config = object.__new__(cls)
        for name, value in {**{f.name: f.default for f in dataclasses.fields(cls)}, **fields}.items():
            object.__setattr__(config, name, value)
        if config.teacher_temperature is None:
            object.__setattr__(config, "teacher_temperature", config.temperature)
        return config

    def sparse_op_args(self) -> tuple:
        """The settings only the sparse-teacher ops take, in ``SPARSE_OP_FIELDS`` order."""
        return tuple(getattr(self, name) for name in SPARSE_OP_FIELDS)

    def kernel_divergence(self) -> int:
        """The kernels' code of the divergence (``DIVERGENCE_CODES``); the generalized JSD at beta = 0
        and 1 is forward and reverse KL (TRL's and Liger's convention)."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return DIVERGENCE_CODES["forward_kl" if self.beta == 0.0 else "reverse_kl"]
        return DIVERGENCE_CODES[self.divergence]


#: The fields of :class:`DistillConfig` the ops take as flat arguments, in their schema's order, with
#: their schema types (the reduction travels apart: the kernels never see it, the op applies it).
OP_FIELDS = {"temperature": "float", "teacher_temperature": "float", "standardize": "bool", "correction": "int",
             "eps": "float", "ignore_index": "int", "label_smoothing": "float", "ce_weight": "float",
             "kd_weight": "float"}
#: The fields the ops take at the end of their schema, each with its default (so that a call that
#: predates a field keeps working): schema type and default.
OP_TAIL_FIELDS = {"divergence": ("str", '"forward_kl"'), "beta": ("float", "0.5"), "dkd_alpha": ("float", "1.0"),
                  "dkd_beta": ("float", "8.0")}

#: The fields only the sparse-teacher ops take (``_ops/sparse_op.py``), after ``OP_TAIL_FIELDS``: schema
#: type and default. The dense ops leave them out: a dense teacher's support is every class, where the
#: three supports are one loss.
SPARSE_OP_FIELDS = {"support": ("str", '"renormalize"'), "generation_temperature": ("float", "1.0")}
#: How a sparse teacher's top-k support is completed into a distribution (docs/design.md, section 9):
#: both distributions renormalized over the support, only the teacher's (the student keeps its
#: normalization over all V classes), or the support plus one tail class holding the remaining mass.
SUPPORTS = ("renormalize", "renormalize_teacher", "tail")

#: The divergences between the teacher's p and the student's q (docs/design.md, section 8) and the
#: kernels' codes for them.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "jeffreys", "tvd")
#: Divergences that need the labels: decoupled KD (DKD, Zhao et al. 2022), the paper's second method.
LABEL_DIVERGENCES = ("dkd",)
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES + LABEL_DIVERGENCES)}


def op_schema_fields() -> str:
    """``OP_FIELDS`` as the arguments of an op schema: ``"float temperature, ..."``."""
    return ", ".join(f"{kind} {name}" for name, kind in OP_FIELDS.items())


def op_schema_sparse() -> str:
    """``SPARSE_OP_FIELDS`` as the last arguments of an op schema, with their defaults."""
    return ", ".join(f"{kind} {name}={default}" for name, (kind, default) in SPARSE_OP_FIELDS.items())


def op_schema_tail() -> str:
    """``OP_TAIL_FIELDS`` as the last arguments of an op schema, with their defaults."""
    return ", ".join(f"{kind} {name}={default}" for name, (kind, default) in OP_TAIL_FIELDS.items())


#: The documentation of each keyword, written once; :func:`document` puts it into the docstrings.
KEYWORD_DOCS = {
    "temperature": "the student's (base) temperature ``tau_s``; the KD term is scaled by ``tau_s**2``. A floating "
                   "tensor (0-dim, or one per row: the logits' leading shape) is a learnable temperature for "
                   "student and teacher both (CTKD), whose gradient the fused kernels return (the cpu and torch "
                   "backends).",
    "teacher_temperature": "the teacher's temperature ``tau_t`` (default: ``temperature``).",
    "standardize": "z-score each row of logits first (False: vanilla Hinton KD).",
    "correction": "1 divides the variance by V - 1 (``torch.std``, the official code), 0 by V (Algorithm 1).",
    "eps": "added to the standard deviation (official code 1e-7; Algorithm 1: 0).",
    "ce_weight": "the weight of the hard-label cross-entropy term (finite, >= 0).",
    "kd_weight": "the weight of the KD term ``tau_s**2 * KL`` (finite, >= 0).",
    "ignore_index": "a row whose label is this contributes to neither term and is not counted.",
    "label_smoothing": "in ``[0, 1)``, as in ``F.cross_entropy``.",
    "mask": "optional bool tensor of the leading shape; False rows give 0 loss and 0 gradient and are not counted.",
    "labels": "integer tensor of the leading shape (e.g. ``input_ids`` shifted by one, padding ``-100``), or "
              "None for pure KD. A label outside ``[0, V)`` that is not ``ignore_index`` raises on the CPU; "
              "on CUDA (no host synchronization) it makes its row's loss and gradient NaN.",
    "reduction": "``\"mean\"`` (over the included rows), ``\"sum\"`` or ``\"none\"`` (per row, excluded rows 0).",
    "return_components": "also return the detached parts: ``DistillationParts(loss, ce, kd)``, ``kd`` being "
                         "``tau_s**2 * KL`` (unweighted), reduced like the loss, from the same launch.",
    "divergence": "the divergence between the teacher's p and the student's q (both after standardization and their "
                  "temperatures): ``\"forward_kl\"`` KL(p || q), ``\"reverse_kl\"`` KL(q || p), ``\"jsd\"`` the generalized "
                  "JSD ``beta KL(p || m) + (1 - beta) KL(q || m)``, m = beta p + (1 - beta) q (TRL's and Liger's "
                  "convention: beta = 0 is forward KL, beta = 1 reverse KL), ``\"jeffreys\"`` KL(p || q) + "
                  "KL(q || p), ``\"tvd\"`` ½ sum |p - q| (at p = q the subgradient 0); each times ``tau_s**2``.",
    "beta": "the generalized JSD's weight of the teacher, in [0, 1] (``divergence=\"jsd\"`` only).",
    "dkd_alpha": "decoupled KD's weight of the target-class term TCKD (``divergence=\"dkd\"``; finite, >= 0).",
    "dkd_beta": "decoupled KD's weight of the non-target term NCKD (``divergence=\"dkd\"``; finite, >= 0).",
    "support": "how a ``SparseTeacher``'s top-k support becomes a distribution: ``\"renormalize\"`` (teacher and "
               "student both renormalized over the teacher's top-k), ``\"renormalize_teacher\"`` (the teacher "
               "renormalized over its top-k, the student normalized over all V classes), ``\"tail\"`` (the top-k "
               "plus one class holding the rest of the mass; needs the teacher's ``log_normalizer``). A dense "
               "teacher's support is every class: the three are then the same loss.",
    "generation_temperature": "the temperature a ``SparseTeacher`` of ``kind=\"logprobs\"`` was stored at; its "
                              "log-probabilities are multiplied by it (logits up to a constant per row) before the "
                              "teacher's standardization and ``teacher_temperature`` (finite, > 0; 1 for every "
                              "other teacher).",
    "backend": "``\"auto\"``, ``\"triton\"``, ``\"cuda\"``, ``\"cpu\"`` or ``\"torch\"`` (the eager reference).",
    "chunk_size": "rows per chunk; None: :func:`~logitstd_kernels.default_chunk_size`.",
    "accum_dtype": "the dtype the weight's and bias's gradients are accumulated in over the chunks; None: "
                   "float32 for bf16/fp16 weights, the weight's dtype otherwise (``torch.bfloat16``: half the "
                   "memory of the float32 accumulator, one rounding per chunk).",
    "student_logit_scale": "multiplies the student's logits first (Cohere's ``logit_scale``; finite, > 0).",
    "teacher_logit_scale": "multiplies the teacher's logits (or ``teacher_logits``) first (finite, > 0).",
    "student_final_logit_softcapping": "None, or ``c`` (finite, > 0): the student's scaled logits become "
                                       "``c * tanh(z / c)`` (Gemma 2/3), before the standardization; the CE "
                                       "term uses them too.",
    "teacher_final_logit_softcapping": "None, or ``c`` (finite, > 0): the teacher's scaled logits become "
                                       "``c * tanh(z / c)``.",
}

_F = TypeVar("_F", bound=Callable)


def document(*names: str) -> Callable[[_F], _F]:
    """Fill ``{keywords}`` in the decorated object's docstring with the docs of ``names``."""
    lines = "\n".join(f"        {name}: {KEYWORD_DOCS[name]}" for name in names)

    def decorate(obj: _F) -> _F:
        obj.__doc__ = (obj.__doc__ or "").replace("{keywords}", lines.lstrip())
        return obj

    return decorate


#: The settings the objective's functions take as keywords, and those of the KD-only functions.
OBJECTIVE_SETTINGS = ("ce_weight", "kd_weight", "temperature", "teacher_temperature", "standardize", "correction", "eps",
                      "ignore_index", "label_smoothing", "divergence", "beta", "dkd_alpha", "dkd_beta", "support",
                      "generation_temperature")
KD_SETTINGS = ("temperature", "teacher_temperature", "standardize", "correction", "eps", "divergence", "beta",
               "support", "generation_temperature")
#: The settings of the decoupled KD loss (its alpha and beta are ``dkd_alpha`` and ``dkd_beta``).
DKD_SETTINGS = ("temperature", "teacher_temperature", "standardize", "correction", "eps", "ignore_index")


def dkd_config(settings: dict, caller: str, alpha: object, beta: object, reduction: str) -> DistillConfig:
    """The config of a decoupled KD call: ``alpha TCKD + beta NCKD`` (each times ``tau_s**2``), no CE."""
    return config_from(settings, DKD_SETTINGS, caller, divergence="dkd", dkd_alpha=check_weight("alpha", alpha),
                       dkd_beta=check_weight("beta", beta), ce_weight=0.0, kd_weight=1.0,
                       reduction=objective_reduction(reduction))


def settings_keywords(names: tuple[str, ...], *, docs: tuple[str, ...] = (), **defaults: object) -> Callable[[_F], _F]:
    """Give the decorated function, which takes the settings ``names`` as ``**settings``, the flat
    keyword-only signature users see (``help``, ``inspect.signature``): one keyword per setting, with
    ``DistillConfig``'s default (or the one in ``defaults``); and fill ``{keywords}`` in its docstring
    with the docs of ``names + docs``. The function builds its config with :func:`config_from`.
    """
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}

    def decorate(func: _F) -> _F:
        signature = inspect.signature(func)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        settings = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=fields[name].type,
                                      default=defaults.get(name, fields[name].default)) for name in names]
        first_keyword = next((i for i, p in enumerate(own) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(own))
        func.__signature__ = signature.replace(parameters=own[:first_keyword] + settings + own[first_keyword:])
        return document(*names, *docs)(func)

    return decorate


def config_from(settings: dict, names: tuple[str, ...], caller: str, **fixed: object) -> DistillConfig:
    """The config of a call's ``**settings`` (only ``names`` allowed, as the signature shows), over
    ``fixed`` (the caller's own defaults and the values it sets itself, such as its reduction)."""
    for name in settings:
        if name not in names:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    return DistillConfig(**{**fixed, **settings})
