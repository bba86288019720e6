"""`hone generate`: a model's completion of a prompt.

    hone generate smollm2 --prompt "The mitochondrion is" --max-new-tokens 30
    hone generate runs/demo/final --prompt "What does the Gene Ontology describe?" --chat
"""

from __future__ import annotations

import typer

from hone.cli.common import log
from hone.errors import HoneError
from hone.model.generate import encode_prompt, generate as generate_ids, load_for_generation
from hone.model.load import pick_device


def generate(model: str = typer.Argument(..., help="HF model directory (e.g. runs/demo/final), a .gguf file, or "
                                                   "smollm2 (the packaged SmolLM2-135M-Instruct)."),
             prompt: str = typer.Option(..., "--prompt", help="Text to complete (the user message with --chat)."),
             chat: bool = typer.Option(False, "--chat",
                                       help="Send the prompt as one user message through the model's chat "
                                            "template."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0, help="Most tokens to generate."),
             temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                               help="0: greedy; above 0: sample at this temperature."),
             top_p: float = typer.Option(1.0, "--top-p", help="Sample from the smallest set of tokens whose "
                                                              "probability reaches P (with --temperature)."),
             seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
             device: str = typer.Option("auto", "--device", help="auto (CUDA when torch sees a GPU), cpu or cuda.")):
    """Print the model's completion of --prompt (greedy unless --temperature; Hone's Llama with its KV cache)."""
    if device not in ("auto", "cpu", "cuda"):
        raise HoneError(f"--device {device!r}: want auto, cpu or cuda")
    m, tok, files = load_for_generation(model)
    m.to(pick_device(device))
    ids, stops = encode_prompt(m, tok, files, prompt, chat=chat)
    out = generate_ids(m, tok, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       stop_ids=stops)
    log(tok.decode(out, skip_special_tokens=True))
