"""The hybrid demo: a language model with GPT-2's architecture, small enough to compile in seconds, with
random weights (nothing to download), and its first block's attention projection in FHE.

The architecture is GPT-2's, module names included (`h.0.attn.c_attn`, as in `transformers`'
`GPT2Model`): token and position embeddings, pre-norm blocks of causal self-attention (`c_attn` projects
to queries, keys and values, `c_proj` back) and a GELU MLP (`c_fc`, `c_proj`), a final norm and an LM head
tied to the token embedding. `transformers` is not a dependency: this module is the few lines of it that
the demo needs.

The model owner runs `compile_hybrid` (in `fhe-bento demo-models`); a data owner rebuilds the same model
from the same seed (`TinyGPT.build`), whose public weights are all that it holds of the remote module's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

NAME = "tiny-gpt2"
REMOTE_MODULES = ["h.0.attn.c_attn"]
CONTEXT_SIZES = (2, 3, 4)  # the prompt and generated lengths the demo's circuits are compiled for
SEED = 0


@dataclass(frozen=True)
class TinyGPTConfig:
    vocab_size: int = 64
    n_positions: int = 8
    n_embd: int = 16
    n_layer: int = 2
    n_head: int = 2


class Attention(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = [
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(width, dim=-1)
        ]
        query, key, value = heads
        scores = query @ key.transpose(-1, -2) / math.sqrt(width // self.n_head)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.c_proj((weights @ value).transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(nn.functional.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)

    @classmethod
    def build(cls, seed: int = SEED, config: TinyGPTConfig | None = None) -> TinyGPT:
        """The demo model: random weights from `seed`, the same on every machine."""
        torch.manual_seed(seed)
        return cls(config or TinyGPTConfig()).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the next token at every position: (batch, length) -> (batch, length, vocab)."""
        positions = torch.arange(input_ids.shape[1])
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding: `prompt` and `new_tokens` more tokens. `model` is a `TinyGPT`, or one whose
    remote modules run in FHE (each step is one forward pass over the whole context)."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def calibration_ids(length: int, rows: int = 64, seed: int = SEED) -> torch.Tensor:
    return torch.randint(
        0, TinyGPTConfig().vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed)
    )


def compile_hybrid(folder: Path, context_sizes: tuple[int, ...] = CONTEXT_SIZES, n_bits: int = 8) -> Path:
    """Compile the demo's remote modules for each context size and save what a server needs into
    `folder` (`save_and_clear_private_info`: one `MODULE/SHAPE_DIR` circuit per size, and the weights)."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    model = TinyGPT.build()
    for length in context_sizes:  # one compilation per input shape, into the same folder
        hybrid = HybridFHEModel(copy.deepcopy(model), REMOTE_MODULES)
        hybrid.compile_model(calibration_ids(length), n_bits=n_bits)
        hybrid.save_and_clear_private_info(folder)
    return folder
