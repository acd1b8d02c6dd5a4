"""Training recipes. Each turns a step's data rows into token sequences (``make_batch``) and a
micro-batch of them into a loss through the fused ops (``loss``)."""
from ..config import Config
from ..model import CausalLM
from .osft import OSFTRecipe
from .sft import SFTRecipe

RECIPES = {"sft": SFTRecipe, "osft": OSFTRecipe}


def make_recipe(config: Config, lm: CausalLM):
    return RECIPES[config.recipe](config, lm)
