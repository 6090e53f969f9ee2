"""Text generation with a Hugging Face transformers model on fastattn.

Two lines make a model use fastattn:

    fastattn.transformers.register()                 # the name "fastattn"
    model.set_attn_implementation("fastattn")        # or from_pretrained(..., attn_implementation="fastattn")

This script generates greedily with transformers' own SDPA attention and
then with fastattn, and prints the tokens per second of each and whether the
two produced the same tokens.  Without --model it builds a small Llama-style
model with random weights (no download); --model takes a local path or a
hub name of a causal language model.

    python examples/hf_generate.py --prompt-tokens 1024 --new-tokens 64
"""
import argparse
import time

import torch
import transformers

import fastattn.transformers


def small_llama():
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=8192)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal LM (local path or hub name); default: a random small Llama")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)

    fastattn.transformers.register()
    model = small_llama() if args.model is None else transformers.AutoModelForCausalLM.from_pretrained(args.model)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for impl in ("sdpa", "fastattn"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            t0 = time.perf_counter()
            outputs[impl] = model.generate(input_ids=ids, max_new_tokens=args.new_tokens,
                                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            seconds = time.perf_counter() - t0
        print(f"{impl:>9}: {args.batch * args.new_tokens / seconds:7.1f} tokens/s "
              f"({args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch {args.batch}, "
              f"{seconds:.2f} s with the prefill)")
    same = torch.equal(outputs["sdpa"], outputs["fastattn"])
    print("same tokens" if same else "tokens differ (near-ties in the logits can break either way)")


if __name__ == "__main__":
    main()
