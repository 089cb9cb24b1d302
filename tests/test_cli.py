"""The command line: every subcommand through ``main([...])`` on a tiny in-process model (``cli.common.load_model``
replaced), bad input (one line on stderr, exit 2 / 1, nothing written, the model never loaded), ``--help``
without torch, and ``apply --merge-to`` reloaded with plain transformers."""

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_knowedit
from hf_knowedit import cli
from hf_knowedit.cli import build_parser, main
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
#: fast method options for tiny models: no statistics, no context templates, few steps
# v_lr=0.5: the tiny model's MLP outputs have norm ~0.01, so the default rate (relative to them) would
# barely move v* in five steps; the reference's absolute rate rewrites the fact
FAST = [
    *("--config", "mom2=identity", "--config", "context_templates=0", "--config", "v_num_grad_steps=5"),
    *("--config", "v_lr=0.5"),
]
FACT = ["--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--target", "Rome"]


@pytest.fixture
def tiny(monkeypatch):
    """``cli.common.load_model`` returns a fresh tiny Llama (the same weights every call); records the calls."""
    calls = []

    def load(args):
        calls.append(args.model)
        return make_tiny_model("llama", seed=1 if args.model == "other" else 0)

    monkeypatch.setattr(cli.common, "load_model", load)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: bad input must be reported before it."""

    def load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli.common, "load_model", load)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def error_line(err):
    """The one error line of a failed command's stderr (logs may precede it; never a traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("hf-knowedit: error:") and err.endswith(lines[0] + "\n"), err
    return lines[0]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -----------------------------------------------------------------------------------------------
# parser, help, entry points


def test_info_lists_architectures_and_methods(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and hf_knowedit.__version__ in out
    for t in ("gpt2", "llama", "gemma3_text"):
        assert t in out
    for m in hf_knowedit.available_methods():
        assert m in out
    data = run_json(capsys, "info")
    assert data["methods"] == hf_knowedit.available_methods() and "llama" in data["architectures"]


def test_module_entry_point_runs_as_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "hf_knowedit", "info"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert "architectures:" in done.stdout
    assert "methods: alphaedit, emmet, encore, memit, moeedit, rlsedit, rome" in done.stdout


def test_help_does_not_import_torch():
    """``--help`` of the program and of every subcommand answers without importing torch (or transformers)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hf_knowedit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0 and "edit" in done.stdout and "apply" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "hf_knowedit.cli" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")]

    script = """
import sys
from hf_knowedit.cli import main
for argv in (["--help"], ["edit", "--help"], ["trace", "--help"], ["eval", "--help"], ["stats", "--help"],
             ["stats", "compute", "--help"], ["apply", "--help"], ["list", "--help"], ["show", "--help"],
             ["info", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, argv
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("HEAVY", heavy)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert done.stdout.count("examples:") == 10  # every help page has copy-paste examples
    assert "{rome,memit,alphaedit,emmet,encore,rlsedit,moeedit}" in done.stdout


def test_builtin_method_choices_are_the_registry_builtins():
    from hf_knowedit.methods.registry import BUILTIN

    assert set(cli.BUILTIN_METHODS) == set(BUILTIN)


def test_parser_defaults():
    args = build_parser().parse_args(["edit", "--prompt", "{} is in", "--subject", "A", "--target", "B"])
    assert args.model == "bundled" and args.method == "rome" and args.layers is None and args.dtype == "float32"
    assert build_parser().parse_args(["edit", "--save", "d"]).out == "d"  # the old flag name still works


@pytest.mark.parametrize(
    "argv, message",
    [
        (["frobnicate"], "invalid choice"),
        (["edit", "--frob"], "unrecognized arguments"),
        (["edit", *FACT, "--method", "romee"], "invalid choice: 'romee'"),
        (["edit", "--prompt", "{} is in", "--subject", "A"], "required: --target"),
        (["edit", *FACT, "--layers", "six"], "--layers: cannot read"),
        (["edit", *FACT, "--config", "context_templates"], "key=value"),
        (["edit", *FACT, "--mom2-n-tokens", "0"], "positive integer"),
        (["edit", *FACT, "--requests", "r.json"], "not both"),
        (["trace", "--prompt", "x"], "required: --prompt, --subject"),
        (["trace", "--prompt", "x is", "--subject", "x", "--rng", "reference", "--seed", "3"], "--seed has no effect"),
        (["trace", "--prompt", "x is", "--subject", "x", "--rng", "numpy"], "invalid choice"),
        (["trace", "--prompt", "The Eiffel Tower is", "--subject", "The Eiffel Tower", "--plot", "t.txt"], ".png"),
        (["eval", "r.json", "--protocol", "batch"], None),  # the missing file is the first problem: exit 1
        (["stats"], "required"),
        (["apply"], "required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, no_model, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # restored afterwards: later tests must not run in a removed directory
    with pytest.raises(SystemExit) if message else _no_raise() as exc:
        code = main(argv)
    err = capsys.readouterr().err
    if message:
        assert exc.value.code == 2
        assert message in err and "Traceback" not in err
    else:
        assert code == 1 and "r.json: no such file" in err


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -----------------------------------------------------------------------------------------------
# bad input is reported before the model loads, in one line, exit 1


@pytest.fixture
def bad_files(tmp_path):
    garbled = tmp_path / "garbled.json"
    garbled.write_text('[{"prompt": "{} is in", "subject": "A", ')
    garbled_jsonl = tmp_path / "garbled.jsonl"
    garbled_jsonl.write_text('{"prompt": "{} is in", "subject": "A", "target_new": "B"}\n{not json}\n')
    bad_subject = write_jsonl(
        tmp_path / "bad_subject.jsonl", [{"prompt": "Paris is in", "subject": "Rome", "target_new": "x"}]
    )
    no_target = write_jsonl(tmp_path / "no_target.jsonl", [{"prompt": "{} is in", "subject": "Paris"}])
    unknown_schema = tmp_path / "unknown.json"
    unknown_schema.write_text(json.dumps([{"foo": 1}]))
    junk_dir = tmp_path / "junk"
    junk_dir.mkdir()
    (junk_dir / "notes.txt").write_text("keep me")
    return dict(
        garbled=garbled,
        garbled_jsonl=garbled_jsonl,
        bad_subject=bad_subject,
        no_target=no_target,
        unknown=unknown_schema,
        junk=junk_dir,
        tmp=tmp_path,
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_requests", "no such file"),
        ("garbled_requests", "is not valid JSON"),
        ("garbled_jsonl", "line 2: not JSON"),
        ("subject_not_in_prompt", "does not occur in prompt"),
        ("record_without_target", "record 0"),
        ("single_subject_not_in_prompt", "does not occur in prompt"),
        ("unknown_config_key", "bogus"),
        ("bad_config_value", "must be an int >= 0"),
        ("out_is_junk_dir", "holds no adapter"),
        ("eval_unknown_schema", "unknown schema"),
        ("trace_subject_not_in_prompt", "does not occur in prompt"),
        ("trace_facts_missing", "no such file"),
        ("apply_missing_adapter", "No adapter directory"),
        ("apply_not_an_adapter", "is not an adapter directory"),
        ("merge_to_junk_dir", "holds no model checkpoint"),
        ("stats_show_missing", "no such file or directory"),
        ("corpus_missing", "no such file"),
        ("local_model_missing", "no such directory"),
    ],
)
def test_bad_input_fails_before_loading_the_model(capsys, no_model, bad_files, case, message):
    f = bad_files
    argv = {
        "missing_requests": ["edit", "--requests", f["tmp"] / "nope.json"],
        "garbled_requests": ["edit", "--requests", f["garbled"]],
        "garbled_jsonl": ["edit", "--requests", f["garbled_jsonl"]],
        "subject_not_in_prompt": ["edit", "--requests", f["bad_subject"]],
        "record_without_target": ["edit", "--requests", f["no_target"]],
        "single_subject_not_in_prompt": ["edit", "--prompt", "Paris is in", "--subject", "Rome", "--target", "x"],
        "unknown_config_key": ["edit", *FACT, "--config", "bogus=1"],
        "bad_config_value": ["edit", *FACT, "--config", "context_templates=-1"],
        "out_is_junk_dir": ["edit", *FACT, "--out", f["junk"]],
        "eval_unknown_schema": ["eval", f["unknown"]],
        "trace_subject_not_in_prompt": ["trace", "--prompt", "Paris is in", "--subject", "Rome"],
        "trace_facts_missing": ["trace", "--facts", f["tmp"] / "known.json"],
        "apply_missing_adapter": ["apply", f["tmp"] / "no_adapter"],
        "apply_not_an_adapter": ["apply", f["junk"]],
        "merge_to_junk_dir": ["apply", f["junk"], "--merge-to", f["junk"]],
        "stats_show_missing": ["stats", "show", f["tmp"] / "nope.safetensors"],
        "corpus_missing": ["edit", *FACT, "--corpus", f["tmp"] / "corpus.txt"],
        "local_model_missing": ["edit", *FACT, "--model", f["tmp"] / "no-model"],
    }[case]
    code, out, err = run(capsys, *argv)
    assert code == 1, err
    assert message in error_line(err)
    assert (f["junk"] / "notes.txt").read_text() == "keep me" and sorted(os.listdir(f["junk"])) == ["notes.txt"]


# -----------------------------------------------------------------------------------------------
# trace


def test_trace_one_fact(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.trace, "MIN_EFFECT_SHARE", float("-inf"))  # a random model's trace is all noise
    plot, saved = tmp_path / "trace.png", tmp_path / "trace.json"
    code, out, _ = run(
        capsys,
        "trace",
        "--prompt",
        "The Eiffel Tower is located in",
        "--subject",
        "The Eiffel Tower",
        "--samples",
        2,
        "--window",
        2,
        "--plot",
        plot,
        "--save",
        saved,
    )
    assert code == 0 and tiny == ["bundled"]
    assert "answer" in out and "suggested layers: rome --layers" in out
    assert plot.stat().st_size > 1000 and hf_knowedit.TraceResult.load(saved).subject == "The Eiffel Tower"
    data = run_json(
        capsys,
        "trace",
        "--prompt",
        "{} is located in",
        "--subject",
        "The Eiffel Tower",
        "--samples",
        2,
        "--kinds",
        "mlp",
        "hidden",
    )
    assert set(data["scores"]) == {"mlp", "hidden"} and data["prompt"] == "The Eiffel Tower is located in"
    assert len(data["suggested_layers"]["rome"]) == 1 and 0 <= data["suggested_layers"]["rome"][0] < 4


def test_trace_rng_reference_maps_to_trace_config(capsys, tiny):
    fact = ["--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--samples", 2, "--kinds", "mlp"]
    ref = run_json(capsys, "trace", *fact, "--rng", "reference")
    default = run_json(capsys, "trace", *fact)
    model, tok = make_tiny_model("llama")
    direct = {
        rng: hf_knowedit.trace_fact(
            model, tok, "The Eiffel Tower is located in", "The Eiffel Tower", kinds=("mlp",), samples=2, rng=rng
        )
        for rng in ("torch", "reference")
    }
    assert ref["settings"]["rng"] == "reference" and "rng" not in default["settings"]
    for data, rng in ((ref, "reference"), (default, "torch")):
        torch.testing.assert_close(torch.tensor(data["scores"]["mlp"]), direct[rng].scores["mlp"].float())
    assert not torch.allclose(torch.tensor(ref["scores"]["mlp"]), torch.tensor(default["scores"]["mlp"]))


def test_trace_facts_file_plots_the_average_and_suggests_layers(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.trace, "MIN_EFFECT_SHARE", float("-inf"))  # a random model's trace is all noise
    facts = [
        {"prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "attribute": "Paris"},
        {"template": "{} is the capital of", "subject": "Berlin", "attribute": "Germany"},
        {"prompt": "Toyota is a car company in", "subject": "Toyota", "attribute": "Japan"},
    ]
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    plot = tmp_path / "aie.png"
    data = run_json(
        capsys, "trace", "--facts", path, "--all-facts", "--samples", 2, "--window", 2, "--limit", 2, "--plot", plot
    )
    assert data["n_facts"] == 2 and data["n_skipped"] == 0
    assert len(data["aie"]["last_subject"]["mlp"]) == 4
    rome, memit = data["suggested_layers"]["rome"], data["suggested_layers"]["memit"]
    assert len(rome) == 1 and memit == list(range(memit[0], memit[0] + 4))  # band of 5 clipped to 4 layers
    assert plot.stat().st_size > 1000


# -----------------------------------------------------------------------------------------------
# edit, show, list


def test_edit_one_fact_saves_an_adapter_that_show_and_list_describe(capsys, tiny, tmp_path):
    out_dir = tmp_path / "edits" / "eiffel"
    data = run_json(
        capsys, "edit", *FACT, "--target-true", "Paris", "--layers", 1, *FAST, "--out", out_dir, "--name", "eiffel"
    )
    assert data["edit_set"]["method"] == "rome" and data["edit_set"]["layers"] == [1]
    assert data["out"] == str(out_dir) and (out_dir / "adapter_model.safetensors").is_file()
    assert data["facts"][0]["prompt"] == "The Eiffel Tower is located in"
    assert data["facts"][0]["before"] != data["facts"][0]["after"]

    code, out, _ = run(capsys, "show", out_dir)
    assert code == 0 and "'The Eiffel Tower is located in': 'Paris' -> 'Rome'" in out and "method: rome" in out
    shown = run_json(capsys, "show", out_dir)
    assert shown["name"] == "eiffel" and shown["requests"][0]["target_new"] == "Rome"

    run(capsys, "edit", *FACT[:4], "--target", "Berlin", "--layers", 2, *FAST, "--out", tmp_path / "edits" / "b")
    code, out, _ = run(capsys, "list", tmp_path)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "rome  1 fact(s)  layers 2" in lines[0] and "name eiffel" in lines[1]
    assert [r["edits"] for r in run_json(capsys, "list", tmp_path / "edits")] == [1, 1]


def test_edit_requests_files_counterfact_and_easyedit_records(capsys, tiny, tmp_path, data_path):
    counterfact = json.loads((data_path / "counterfact_500.json").read_text())[:3]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(counterfact))
    data = run_json(
        capsys, "edit", "--requests", path, "--limit", 2, "--method", "memit", "--layers", "1-2", *FAST, "--show", 1
    )
    assert data["edit_set"]["edits"] == 2 and data["edit_set"]["layers"] == [1, 2] and len(data["facts"]) == 1
    flat = json.loads((data_path / "counterfact_flat_edit_10000.json").read_text())[:2]
    jsonl = write_jsonl(tmp_path / "flat.jsonl", flat)
    data = run_json(capsys, "edit", "--requests", jsonl, "--method", "emmet", "--layers", "1,2", *FAST)
    assert data["edit_set"]["method"] == "emmet" and data["edit_set"]["edits"] == 2
    assert data["facts"][0]["target_new"] == flat[0]["target_new"]


def test_edit_layers_auto_traces_first(capsys, tiny, caplog):
    with caplog.at_level(logging.INFO, logger="hf_knowedit"):
        data = run_json(capsys, "edit", *FACT, "--layers", "auto", "--samples", 2, "--window", 2, *FAST)
    assert "--layers auto: tracing 1 fact(s)" in caplog.text
    assert len(data["edit_set"]["layers"]) == 1 and 0 <= data["edit_set"]["layers"][0] < 4


def test_edit_statistics_default_is_cheap_and_says_so(capsys, tiny, tmp_path, caplog, monkeypatch):
    """Without --mom2-n-tokens the CLI asks for the library's default (10 × d_in tokens, so that the CLI and Python
    share one cache entry) and logs how many and how to go cheaper; --corpus and --mom2-n-tokens reach the
    method config."""
    monkeypatch.setenv("HF_KNOWEDIT_STATS_CACHE", str(tmp_path / "stats"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is in Paris.\n\nBerlin is the capital of Germany.\n" * 20)
    args = build_parser().parse_args(["edit", *FACT, "--corpus", str(corpus)])
    cfg, config = cli._edit_config(args, "rome")
    assert config.mom2_n_tokens is None and config.mom2_n_keys == 10 and len(cfg["mom2_corpus"]) == 40
    args = build_parser().parse_args(["edit", *FACT, "--mom2-n-tokens", "300"])
    assert cli._edit_config(args, "memit")[1].mom2_n_tokens == 300
    with caplog.at_level(logging.INFO, logger="hf_knowedit"):
        data = run_json(
            capsys,
            "edit",
            *FACT,
            "--layers",
            1,
            "--corpus",
            corpus,
            "--mom2-n-tokens",
            300,
            "--config",
            "context_templates=0",
            "--config",
            "v_num_grad_steps=3",
            "--out",
            tmp_path / "a",
        )
    assert "Pass --mom2-n-tokens N or --corpus FILE to make it cheaper" in caplog.text
    assert "300 tokens of the 40 texts of --corpus" in caplog.text
    assert data["edit_set"]["edits"] == 1 and len(list((tmp_path / "stats").glob("*.safetensors"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_knowedit"):
        run(
            capsys,
            "edit",
            *FACT[:4],
            "--target",
            "Berlin",
            "--layers",
            1,
            "--config",
            "context_templates=0",
            "--config",
            "v_num_grad_steps=1",
            "--corpus",
            corpus,
        )
    assert "960 tokens (10 × the key size d_in = 96: the default)" in caplog.text  # the tiny Llama's d_in


def test_edit_push_to_the_hub(capsys, tiny, hub):
    data = run_json(capsys, "edit", *FACT, "--layers", 1, *FAST, "--push", "eiffel-edit")
    assert "eiffel-edit" in data["pushed"]
    shown = run_json(capsys, "show", f"{hub.user}/eiffel-edit")
    assert shown["requests"][0]["subject"] == "The Eiffel Tower"
    applied = run_json(capsys, "apply", f"{hub.user}/eiffel-edit", "--prompt", "The Eiffel Tower is located in")
    assert applied["applied"][0]["source"] == f"{hub.user}/eiffel-edit" and applied["applied"][0]["method"] == "rome"


def test_model_from_a_local_directory_with_dtype(capsys, tmp_path):
    """The real ``load_model``: a local checkpoint directory, ``--dtype``, ``--device-map``."""
    model, tok = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    args = build_parser().parse_args(["edit", "--model", str(tmp_path / "tiny"), "--dtype", "bfloat16"])
    loaded, _ = cli.load_model(args)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    args = build_parser().parse_args(["edit", "--model", str(tmp_path / "tiny"), "--device-map", "cpu"])
    assert cli.load_model(args)[0].device.type == "cpu"
    data = run_json(capsys, "edit", *FACT, "--model", tmp_path / "tiny", "--layers", 1, *FAST)
    assert data["edit_set"]["base_model"] == str(tmp_path / "tiny")


# -----------------------------------------------------------------------------------------------
# eval


def test_eval_markdown_and_json(capsys, tiny, tmp_path, data_path):
    records = json.loads((data_path / "counterfact_500.json").read_text())[:2]
    path = write_jsonl(tmp_path / "cf.jsonl", records)
    code, out, _ = run(capsys, "eval", path, "--no-fluency")
    assert code == 0 and "**unedited**" in out and "| ES |" in out
    report = tmp_path / "report.json"
    data = run_json(
        capsys,
        "eval",
        path,
        "--method",
        "rome",
        "--protocol",
        "batch",
        "--layers",
        1,
        *FAST,
        "--no-fluency",
        "--limit",
        2,
        "--out",
        report,
    )
    assert data["method"] == "rome" and data["protocol"] == "batch" and data["n_records"] == 2
    assert data["post"]["ES"] >= data["pre"]["ES"] and not data["failed"]
    assert json.loads(report.read_text())["n_records"] == 2


# -----------------------------------------------------------------------------------------------
# stats


def test_stats_compute_show_push_pull(capsys, tiny, tmp_path, hub):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([{"text": "The Eiffel Tower is located in Paris."}, "Berlin is in Germany."] * 30))
    cache = tmp_path / "stats"
    data = run_json(
        capsys, "stats", "compute", "--layers", "1-2", "--corpus", corpus, "--n-tokens", 200, "--cache-dir", cache
    )
    assert [e["key"]["layer"] for e in data] == [1, 2] and data[0]["shape"] == [96, 96]
    assert data[0]["n_tokens_used"] == 200 and Path(data[0]["path"]).is_file()
    code, out, _ = run(capsys, "stats", "show", cache)
    assert code == 0 and out.count("shape (96, 96), tokens 200 used of 200 requested") == 2
    shown = run_json(capsys, "stats", "show", data[0]["path"])
    assert shown[0]["key"] == data[0]["key"]

    pushed = run_json(capsys, "stats", "push", data[0]["path"], "stats-repo")
    assert "stats-repo" in pushed["commit"]
    pulled = run_json(
        capsys, "stats", "pull", f"{hub.user}/stats-repo", data[0]["file"], "--cache-dir", tmp_path / "c2"
    )
    assert pulled["key"] == data[0]["key"] and Path(pulled["path"]).is_file()


# -----------------------------------------------------------------------------------------------
# apply


def _logits(model, tok, text="The Eiffel Tower is located in"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def test_apply_merge_to_reloads_with_plain_transformers(capsys, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    run_json(capsys, "edit", *FACT, "--layers", 1, *FAST, "--out", a)
    run_json(
        capsys,
        "edit",
        "--prompt",
        "{} is the capital of",
        "--subject",
        "Berlin",
        "--target",
        "Japan",
        "--method",
        "memit",
        "--layers",
        "2-3",
        *FAST,
        "--out",
        b,
    )

    code, out, err = run(capsys, "apply", a, b, "--prompt", "The Eiffel Tower is located in")
    assert code == 0, err
    assert f"{a}: " in out and "memit, 1 fact(s), layers [2, 3]" in out
    assert "'The Eiffel Tower is located in':" in out

    merged = tmp_path / "merged"
    data = run_json(capsys, "apply", a, b, "--merge-to", merged)
    assert data["merged_to"] == str(merged) and [r["method"] for r in data["applied"]] == ["rome", "memit"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(os.listdir(merged))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700

    edited, tok = make_tiny_model("llama")
    hf_knowedit.load_edits(edited, str(a))
    hf_knowedit.load_edits(edited, str(b))
    base, _ = make_tiny_model("llama")
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(merged)
    assert torch.allclose(_logits(reloaded, reloaded_tok), _logits(edited, tok), atol=1e-5)
    assert not torch.allclose(_logits(base, tok), _logits(edited, tok), atol=1e-3)  # the edits changed the output

    card = (merged / "README.md").read_text()
    assert "knowledge-editing" in card and "| 1 | " in card and "| 2 | " in card
    assert "| rome |" in card and "| memit |" in card and "The Eiffel Tower is located in" in card
    assert "| Berlin is the capital of | – | Japan |" in card

    # writing again onto the earlier merged checkpoint replaces it
    assert run(capsys, "apply", a, "--merge-to", merged)[0] == 0
    assert "| memit |" not in (merged / "README.md").read_text()


MOE_SHOWN = {
    # model type: (a line `show` prints, the `show --json` entry and its value)
    "mixtral": (
        "model.layers.1.mlp.experts: 4 routed experts, rank 1",
        "num_experts",
        {"model.layers.1.mlp.experts": 4, "model.layers.2.mlp.experts": 4},
    ),
    "deepseek_v2": (
        "model.layers.1.mlp.shared_experts.down_proj: rank 1 (LoRA on its weight parameter: PEFT target_parameters)",
        "peft_targets",
        {f"model.layers.{i}.mlp.shared_experts.down_proj": "parameter" for i in (1, 2)},
    ),
}


@pytest.mark.parametrize("model_type", list(MOE_SHOWN))  # routed experts; a shared expert named by its weight
def test_moe_adapter_shows_and_merges_to_a_plain_checkpoint(model_type, capsys, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    line, field, value = MOE_SHOWN[model_type]
    monkeypatch.setattr(cli.common, "load_model", lambda args: make_tiny_model(model_type))
    edited, tok = make_tiny_model(model_type)
    fact = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    cheap = dict(mom2="identity", context_templates=0, v_num_grad_steps=5, v_lr=0.5, mom2_update_weight=1e-3)
    es = hf_knowedit.apply_edits(edited, tok, fact, "memit", layers=[1, 2], merge=False, **cheap)
    es.save_pretrained(tmp_path / "a")

    code, out, _ = run(capsys, "show", tmp_path / "a")
    assert code == 0 and line in out
    assert run_json(capsys, "show", tmp_path / "a")[field] == value

    merged = tmp_path / "merged"
    assert run_json(capsys, "apply", tmp_path / "a", "--merge-to", merged)["merged_to"] == str(merged)
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    want = _logits(edited, tok)  # the hooked edit
    assert torch.allclose(_logits(reloaded, AutoTokenizer.from_pretrained(merged)), want, atol=1e-5)
    assert not torch.allclose(_logits(make_tiny_model(model_type)[0], tok), want, atol=1e-4)


def test_apply_refuses_an_adapter_for_another_base_model(capsys, tiny, tmp_path):
    a = tmp_path / "a"
    run_json(capsys, "edit", *FACT, "--layers", 1, *FAST, "--out", a)
    merged = tmp_path / "merged"
    code, out, err = run(capsys, "apply", a, "--model", "other", "--merge-to", merged)
    assert code == 1 and error_line(err).startswith(f"hf-knowedit: error: {a}:") and "--force" in err
    assert not merged.exists()
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_merge_to_failure_leaves_nothing_half_written(capsys, tiny, tmp_path, monkeypatch):
    a = tmp_path / "a"
    run_json(capsys, "edit", *FACT, "--layers", 1, *FAST, "--out", a)
    merged = tmp_path / "merged"
    merged.mkdir()  # an empty directory is a valid target

    from transformers import PreTrainedTokenizerFast

    def broken(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken)
    code, _, err = run(capsys, "apply", a, "--merge-to", merged)
    assert code == 1 and "disk full" in error_line(err)
    assert merged.is_dir() and not os.listdir(merged)
    assert sorted(os.listdir(tmp_path)) == ["a", "merged"]


def test_merge_to_unwritable_directory_is_refused_before_loading(capsys, no_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, "apply", tmp_path / "x", "--merge-to", blocker / "merged")
    assert code == 1 and "cannot write in" in err and str(blocker) in err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    code, _, err = run(capsys, "apply", tmp_path / "x", "--merge-to", locked / "merged")
    assert code == 1 and "cannot write in" in err and "permission denied" in err
    assert not os.listdir(locked)


def test_merge_to_a_file_is_refused(capsys, no_model, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("x")
    code, _, err = run(capsys, "apply", tmp_path / "x", "--merge-to", target)
    assert code == 1 and "is a file" in err and target.read_text() == "x"


# -----------------------------------------------------------------------------------------------
# small things around the CLI


def test_save_pretrained_returns_the_directory(tmp_path):
    from tests.test_stack import random_set

    model, _ = make_tiny_model("llama")
    es = random_set(model, [1])
    assert es.save_pretrained(tmp_path / "x") == tmp_path / "x"


def test_unknown_keys_warning_does_not_claim_a_newer_version(tmp_path, caplog):
    from tests.test_stack import random_set

    model, _ = make_tiny_model("llama")
    path = random_set(model, [1]).save_pretrained(tmp_path / "x")
    meta = json.loads((path / "knowedit_config.json").read_text())
    meta["hologram"] = 1
    (path / "knowedit_config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        hf_knowedit.EditSet.from_pretrained(path)
    text = caplog.text
    assert f"written by hf_knowedit {hf_knowedit.__version__}" in text and "hologram" in text
    assert "was written by a newer" not in text


def test_eval_chat_adds_the_chat_metrics(capsys, tiny, tmp_path, data_path):
    records = json.loads((data_path / "counterfact_500.json").read_text())[:2]
    path = write_jsonl(tmp_path / "cf.jsonl", records)
    data = run_json(capsys, "eval", path, "--no-fluency", "--chat")
    assert {"chat_ES", "chat_PS", "chat_NS", "chat_keep"} <= set(data["pre"]) and data["settings"]["chat"]
    assert "chat_ES" not in run_json(capsys, "eval", path, "--no-fluency")["pre"]


def test_eval_finds_a_bare_data_file_name_where_the_readme_says(capsys, tiny, tmp_path, data_path, monkeypatch):
    """``hf-knowedit eval counterfact_500.json`` from a folder without that file reads it from
    ``$HF_KNOWEDIT_DATA``, else from ``../shared/data`` (the README's layout)."""
    for env, cwd in ((str(data_path), tmp_path), (None, tmp_path / "repo")):
        if env is None:
            monkeypatch.delenv("HF_KNOWEDIT_DATA", raising=False)
            (tmp_path / "shared").mkdir(exist_ok=True)
            (tmp_path / "shared" / "data").mkdir(exist_ok=True)
            (tmp_path / "shared" / "data" / "counterfact_500.json").write_bytes(
                (data_path / "counterfact_500.json").read_bytes()
            )
        else:
            monkeypatch.setenv("HF_KNOWEDIT_DATA", env)
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        data = run_json(capsys, "eval", "counterfact_500.json", "--no-fluency", "--limit", 2)
        assert data["n_records"] == 2
    monkeypatch.chdir(tmp_path / "repo")
    code, _, err = run(capsys, "eval", "counterfact_999.json", "--no-fluency")  # nowhere: still a clean error
    assert code == 1 and "counterfact_999.json: no such file" in err


def test_trace_suggests_a_layer_only_when_the_effect_stands_above_noise(capsys, tiny, monkeypatch):
    """A peak MLP effect under ``MIN_EFFECT_SHARE`` of the total effect suggests nothing and points to the
    measured defaults (a +0.0065 'peak' once suggested layer 14 on SmolLM2 against signal at 0-5)."""
    fact = ["--prompt", "{} is located in", "--subject", "The Eiffel Tower", "--samples", 2, "--kinds", "mlp"]
    monkeypatch.setattr(cli.trace, "MIN_EFFECT_SHARE", float("inf"))
    code, out, _ = run(capsys, "trace", *fact)
    assert code == 0 and "no MLP layer stands out" in out and "suggested layers" not in out
    assert "keep the measured defaults: rome --layers 1; memit --layers 0-2" in out  # 4 layers: round(0.2*3), band
    assert run_json(capsys, "trace", *fact)["suggested_layers"] == {}
    monkeypatch.setattr(cli.trace, "MIN_EFFECT_SHARE", float("-inf"))
    data = run_json(capsys, "trace", *fact)
    assert len(data["suggested_layers"]["rome"]) == 1


def test_a_trace_shows_progress_once_it_runs_a_few_seconds(monkeypatch, capsys):
    """``progress=None`` (the default) shows the bar for a trace that runs longer than ``PROGRESS_DELAY_S``
    whatever its size (a one-fact CPU trace once ran minutes without one); ``progress=False`` never."""
    from hf_knowedit.tracing import engine

    model, tok = make_tiny_model("llama")
    monkeypatch.setattr(engine, "PROGRESS_DELAY_S", 0.0)
    args = (model, tok, "The Eiffel Tower is located in", "The Eiffel Tower")
    hf_knowedit.trace_fact(*args, kinds=("mlp",), samples=2)
    assert "causal trace" in capsys.readouterr().err
    hf_knowedit.trace_fact(*args, kinds=("mlp",), samples=2, progress=False)
    assert "causal trace" not in capsys.readouterr().err


def test_show_vllm_says_how_vllm_serves_the_adapter(capsys, tiny, tmp_path):
    out_dir = tmp_path / "eiffel"
    run(
        capsys,
        "edit",
        "--prompt",
        "{} is in",
        "--subject",
        "The Eiffel Tower",
        "--target",
        "Rome",
        *FAST,
        "--out",
        out_dir,
    )
    code, out, _ = run(capsys, "show", out_dir, "--vllm")
    assert code == 0 and "vLLM: loads with --enable-lora; rank 1: the default --max-lora-rank 16 holds it" in out
    assert run_json(capsys, "show", out_dir, "--vllm")["vllm"] == {"fits": True, "rank": 1, "max_lora_rank": 1}


def test_statistics_size_names_what_the_method_config_will_average():
    """The plan line's token count is the one the statistics pass uses (``n_tokens_for``), for every way of
    setting it: the default multiple, an explicit ``mom2_n_keys``, an explicit ``mom2_n_tokens``."""
    from types import SimpleNamespace

    from hf_knowedit.cli.common import statistics_size
    from hf_knowedit.methods.statistics import n_tokens_for

    model, _ = make_tiny_model("llama")
    for cfg, words in [
        (hf_knowedit.ROMEConfig(), "960 tokens (10 × the key size d_in = 96: the default)"),
        (hf_knowedit.ROMEConfig(mom2_n_keys=3), "288 tokens (3 × the key size d_in = 96)"),
        (hf_knowedit.MEMITConfig(mom2_n_tokens=500, mom2_n_keys=3), "500 tokens"),
        (
            SimpleNamespace(mom2_n_tokens=None, mom2_n_keys=None),
            "960 tokens (10 × the key size d_in = 96: the default)",
        ),
    ]:
        assert statistics_size(model, 1, cfg) == words
        assert words.startswith(f"{n_tokens_for(model, 1, cfg):,} tokens")


def test_preserve_file_reaches_the_method_config(tmp_path):
    """``--preserve FILE``: the texts become ``mom2_preserve`` (weight from ``--config``); given twice, or a
    missing file, is refused before any model loads."""
    keep = tmp_path / "keep.txt"
    keep.write_text("Tokyo is a large city in Japan.\n\nWater boils at one hundred degrees.\n")
    config = cli._edit_config(build_parser().parse_args(["edit", *FACT, "--preserve", str(keep)]), "memit")[1]
    assert config.mom2_preserve == ["Tokyo is a large city in Japan.", "Water boils at one hundred degrees."]
    assert config.mom2_preserve_weight == 10.0
    args = build_parser().parse_args(
        ["edit", *FACT, "--preserve", str(keep), "--config", "mom2_preserve_weight=3", "--method", "rome"]
    )
    assert cli._edit_config(args, "rome")[1].mom2_preserve_weight == 3
    args = build_parser().parse_args(["edit", *FACT, "--preserve", str(keep), "--config", "mom2_preserve=x"])
    with pytest.raises(cli.common.UsageError, match="give --preserve or --config mom2_preserve"):
        cli._edit_config(args, "memit")
    args = build_parser().parse_args(["edit", *FACT, "--preserve", str(tmp_path / "missing.txt")])
    with pytest.raises(hf_knowedit.errors.KnowEditError, match="missing.txt"):
        cli._edit_config(args, "memit")
