"""Checks of the losses' arguments: each names the argument and what was expected."""
import torch
from torch import Tensor

from ..checks import is_finite_number

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "k1+", "low_var_kl+")
PG_LOSSES = ("ppo", "cispo", "sapo")


def check_mask(mask, like: Tensor, name: str = "mask") -> Tensor:
    """A bool (or integer/float 0/1) tensor with ``like``'s shape and device, returned as bool."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the per-token values are on {like.device}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be a bool tensor or contain only 0 and 1")
        mask = mask != 0
    return mask


def check_number(name: str, value, *, low: float | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_finite_number(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_log_ratio_limit(value) -> None:
    if value is not None and (not is_finite_number(value) or value <= 0):
        raise ValueError(f"log_ratio_limit must be None or a finite number > 0, got {value!r}")


def check_finite_at(mask: Tensor, **values: Tensor | None) -> None:
    """Refuse the first of ``values`` that is not finite at ``mask``, reading all the checks back at once."""
    named = [(name, value) for name, value in values.items() if value is not None]
    if not named:
        return
    finite = torch.stack([torch.isfinite(torch.where(mask, value, 0.0)).all() for _, value in named]).tolist()
    for (name, _), ok in zip(named, finite):
        if not ok:
            raise ValueError(f"{name} must be finite at the masked (completion) tokens")


def check_like(name: str, value, like: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != like.shape:
        raise ValueError(f"{name} must have the shape of logprobs {tuple(like.shape)}, got {tuple(value.shape)}")
    return value.to(like.device)


def check_importance_options(cap_name: str, cap, level_name: str, level) -> None:
    check_number(cap_name, cap, low=0.0)
    if cap <= 0:
        raise ValueError(f"{cap_name} must be > 0, got {cap!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"{level_name} must be 'token' or 'sequence', got {level!r}")


def check_interval(name: str, value) -> tuple[float, float]:
    if (not isinstance(value, tuple | list) or len(value) != 2
            or not all(is_finite_number(v) for v in value)
            or value[0] > value[1]):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def check_policy_options(*, clip_low, clip_high, dual_clip, pg_loss, sapo_temperatures, kl_coef, kl_estimator,
                         kl_bias_correction, entropy_coef, entropy_agg, log_ratio_limit) -> None:
    """The scalar options of the policy loss (see :func:`osft_kernels.losses.policy_loss`)."""
    check_number("clip_low", clip_low, low=0.0)
    check_number("clip_high", clip_high, low=0.0)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    check_number("dual_clip", dual_clip, allow_none=True)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
    if pg_loss not in PG_LOSSES:
        raise ValueError(f"pg_loss must be one of {PG_LOSSES}, got {pg_loss!r}")
    if dual_clip is not None and pg_loss != "ppo":
        raise ValueError(f"dual_clip applies to pg_loss='ppo', not {pg_loss!r}")
    if (not isinstance(sapo_temperatures, tuple | list) or len(sapo_temperatures) != 2
            or not all(is_finite_number(t) and t > 0 for t in sapo_temperatures)):
        raise ValueError(f"sapo_temperatures must be a pair of finite numbers > 0, got {sapo_temperatures!r}")
    check_number("kl_coef", kl_coef, low=0.0)
    check_number("entropy_coef", entropy_coef)
    check_log_ratio_limit(log_ratio_limit)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not isinstance(kl_bias_correction, bool):
        raise TypeError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")
    if entropy_agg is not None and entropy_agg not in AGGREGATIONS:
        raise ValueError(f"entropy_agg must be None or one of {AGGREGATIONS}, got {entropy_agg!r}")
