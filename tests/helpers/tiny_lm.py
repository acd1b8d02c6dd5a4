"""A tiny causal LM and its tokenizer, built locally (a word-level tokenizer trained on a few
arithmetic sentences, a 2-layer Llama from a config), saved as a model directory; and a matching
data file. Nothing is downloaded."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def arithmetic_rows(count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"prompt": f"what is {a} plus {b} ?", "answer": str(a + b),
                     "response": f"{a} plus {b} is {a + b} . the answer is {a + b}"})
    return rows


def build_tiny_model(directory: Path, *, seed: int = 0, tie_embeddings: bool = True, hidden_size: int = 32,
                     num_heads: int = 4) -> Path:
    """``hidden_size / num_heads`` is the attention head size (vLLM's CPU kernels need e.g. 64)."""
    words = " ".join(r["prompt"] + " " + r["response"] for r in arithmetic_rows())
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>", "<user>", "<assistant>"])
    tokenizer.train_from_iterator([words] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=num_heads, num_key_value_heads=max(num_heads // 2, 1),
                         max_position_embeddings=128,
                         tie_word_embeddings=tie_embeddings, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
