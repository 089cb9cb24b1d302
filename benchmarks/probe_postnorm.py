"""Why MEMIT's residual does not arrive on Gemma-3: one z, added two ways.

z is optimised at the residual after block ``--layer`` (MEMIT's site) for CounterFact record 0; its δ is then
added at the subject's last token (a) to the block's output, as MEMIT assumes its update arrives, and (b) to
``mlp.down_proj``'s output, where MEMIT writes it, which Gemma 2/3 pass through ``post_feedforward_layernorm``
before the residual add. Prints the mean NLL of (target_new, target_true) for the rewrite prompt.

    python benchmarks/probe_postnorm.py --model gemma3 --layer 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchlib import data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hf_knowedit._bundled import load_bundled
    from hf_knowedit.architectures import get_architecture, get_module, layer_path, mlp_out_path
    from hf_knowedit.evaluation import score_targets
    from hf_knowedit.methods.memit import MEMITConfig
    from hf_knowedit.methods.targets import optimize_targets
    from hf_knowedit.requests import to_request
    from hf_knowedit.tokens import encode_template

    record = json.loads((data_dir(args.data) / "counterfact_500.json").read_text())[0]
    req = to_request(record)
    model, tok = load_bundled(args.model)
    spec = get_architecture(model)
    res = optimize_targets(model, tok, [req], args.layer, MEMITConfig(), site="residual")
    delta = res.targets[0] - res.init[0]
    pos = encode_template(tok, req.prompt, req.subject).subject_last

    def nll() -> tuple[float, float]:
        s = score_targets(model, tok, [(req.text, req.target_new), (req.text, req.target_true)])
        return round(s[0].mean_nll, 3), round(s[1].mean_nll, 3)

    def adding(mod, inputs, out):
        x = (out[0] if isinstance(out, tuple) else out).clone()
        x[:, pos] += delta
        return (x, *out[1:]) if isinstance(out, tuple) else x

    print("z loss", res.losses, "| unedited (new, true):", nll())
    for where, path in (
        ("block output", layer_path(spec, args.layer)),
        ("down_proj output", mlp_out_path(spec, args.layer)),
    ):
        handle = get_module(model, path).register_forward_hook(adding)
        try:
            print(f"δ added to the {where}:", nll())
        finally:
            handle.remove()


if __name__ == "__main__":
    main()
