"""llamette: run Llama-family language models from Python, on the CPU.

model = llamette.Transformer.load("stories15M.bin")
tokenizer = llamette.Tokenizer.load("tokenizer.bin")
sampler = llamette.Sampler(model.config.vocab_size, temperature=0.8, seed=42)
print(llamette.generate(model, tokenizer, sampler, "Once upon a time", steps=100).text)
"""

from llamette.errors import LlametteError
from llamette.generate import Generation, chat, generate
from llamette.llama import Llama
from llamette.model import Transformer
from llamette.sampler import Sampler
from llamette.tokenizer import Tokenizer
from llamette.weights import ModelConfig, Weights

__all__ = [
    "Generation",
    "Llama",
    "LlametteError",
    "ModelConfig",
    "Sampler",
    "Tokenizer",
    "Transformer",
    "Weights",
    "chat",
    "generate",
]
__version__ = "0.1.0"
