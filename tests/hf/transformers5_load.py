"""Run with transformers 5 first on PYTHONPATH: load each export, compare with the reference
logits saved beside it, check cached greedy generation and the standard call with the export's
tokenizer, `generate(**tok(text))`. Prints one JSON line per export."""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

for export in sys.argv[1:]:
    ref = torch.load(f"{export}/reference.pt")
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        diff = (model(ref["tokens"]).logits - ref["logits"]).abs().max().item()
        prompt = ref["tokens"][:, :4]
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                do_sample=False, use_cache=True, pad_token_id=0)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        # transformers 5's AutoTokenizer reads config.json first and, for an export's auto_map, asks
        # on stdout whether to run its code (no answer here: it goes on without); hence the newline
        tok = AutoTokenizer.from_pretrained(export)
        inputs = tok("The for statement", return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    print("\n" + json.dumps({
        "export": export, "version": transformers.__version__, "class": type(model).__name__,
        "max_diff": diff, "generate_matches": torch.equal(cached, seq), "tokenizer_inputs": list(inputs),
        "tokenizer_generate": new.shape[1] - inputs["input_ids"].shape[1]}))
