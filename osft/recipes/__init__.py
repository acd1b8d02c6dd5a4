"""Training recipes. Each turns a batch of data rows into token sequences (``make_batch``), and a
micro-batch of them into ``(loss, metrics)`` through the fused ops (``loss``); a batch serves
``updates_per_batch`` optimizer steps."""
from typing import ClassVar, Protocol

from torch import Tensor

from ..config import Config
from ..data import Sequences
from ..model import CausalLM
from ..rollout import RolloutEngine, make_engine
from .grpo import GRPORecipe
from .osft import OSFTRecipe
from .pear import PEARRecipe
from .sft import SFTRecipe


class Recipe(Protocol):
    """What the training loop asks of a recipe."""

    columns: ClassVar[tuple[str, ...]]  # the DataConfig fields naming the data columns it reads
    generates: ClassVar[bool]           # whether it samples from the policy (made with a rollout engine)
    updates_per_batch: int              # optimizer steps each batch serves

    def make_batch(self, rows: list[dict], epoch: float) -> tuple[Sequences, dict[str, float]]:
        """The token sequences of ``rows`` (generating them, for the online recipes), and metrics."""

    def num_items(self, batch: Sequences) -> float:
        """The count the whole batch's loss divides by (:func:`osft_kernels.losses.count_items`)."""

    def loss(self, micro: Sequences, num_items: float) -> tuple[Tensor, dict[str, Tensor]]:
        """A micro-batch's share of the batch loss, and its metrics as tensors (read back once a step)."""


RECIPES: dict[str, type[Recipe]] = {"sft": SFTRecipe, "osft": OSFTRecipe, "pear": PEARRecipe, "grpo": GRPORecipe}


def make_recipe(config: Config, lm: CausalLM, engine: RolloutEngine | None = None) -> Recipe:
    """``config.recipe``'s recipe for ``lm``; one that generates samples with ``engine`` (default: a new
    ``rollout.engine`` engine of ``lm``)."""
    recipe = RECIPES[config.recipe]
    if not recipe.generates:
        return recipe(config, lm)
    return recipe(config, lm, engine if engine is not None else make_engine(lm, config))
