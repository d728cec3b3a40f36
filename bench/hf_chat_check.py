#!/usr/bin/env python3
"""Loads the chat model `chat_sft` wrote (an HF folder) with HF transformers' Auto classes, renders
questions with the folder's own chat template, and answers them greedily: the check that the
folder is a working `Gemma3ForCausalLM` outside this workspace. Prints one JSON line per question.

    .venv/bin/python bench/hf_chat_check.py runs/chat_sft/model
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = [
    'What does "harbour" mean?',
    'Give me a synonym for "quick".',
    "Which text is this passage from?\n\nIt is a truth universally acknowledged, that a single man in "
    "possession of a good fortune, must be in want of a wife.",
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "runs/chat_sft/model"
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=[eot, tok.eos_token_id])
        new = out[0, ids.shape[1]:].tolist()
        print(json.dumps({"class": type(model).__name__, "question": q,
                          "answer": tok.decode(new, skip_special_tokens=True),
                          "ended_with_end_of_turn": bool(new) and new[-1] == eot}), flush=True)


if __name__ == "__main__":
    main()
