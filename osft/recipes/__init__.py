"""Training recipes. Each turns a batch of data rows into token sequences (``make_batch``), and a
micro-batch of them into ``(loss, metrics)`` through the fused ops (``loss``); a batch serves
``updates_per_batch`` optimizer steps."""
from ..config import Config
from ..model import CausalLM
from .grpo import GRPORecipe
from .osft import OSFTRecipe
from .pear import PEARRecipe
from .sft import SFTRecipe

RECIPES = {"sft": SFTRecipe, "osft": OSFTRecipe, "pear": PEARRecipe, "grpo": GRPORecipe}


def make_recipe(config: Config, lm: CausalLM):
    return RECIPES[config.recipe](config, lm)
