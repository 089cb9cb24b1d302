"""The Edit Studio's logic without a browser: :class:`hf_knowedit.studio.Studio` on a tiny model (predict,
trace, edit with before / after, disable / enable, revert, save, push), its error messages, the ``studio``
subcommand's checks, ``app.py``, and that nothing but the studio imports gradio. The browser test is
``tests/test_studio_browser.py``."""

import ast
import copy
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_knowedit
from hf_knowedit import cli, studio
from hf_knowedit.editset import EditSet
from hf_knowedit.errors import (
    EditConflictError,
    EditSetNotFoundError,
    InvalidConfigError,
    InvalidRequestError,
    KnowEditError,
    SubjectNotFoundError,
)
from hf_knowedit.studio import STATS_SAMPLED, Studio, parse_layers, ui_message
from tests.helpers import logits
from tests.tiny_models import make_tiny_model, weights

ROOT = Path(__file__).resolve().parents[1]
#: a fact whose subject ends the prompt: in a random tiny model only that position reaches the next token
PROMPT, SUBJECT, TARGET = "The mother tongue of Thomas Mann", "Thomas Mann", "Rome"
#: ROME on a tiny model: no statistics, no clamp, no weight decay, and the reference's absolute rate (the
#: default is relative to the tiny model's ~0.01 MLP outputs), so the edit wins the top-1
TINY_EDIT = {"clamp_norm_factor": 1e4, "v_weight_decay": 0.0, "v_num_grad_steps": 10, "v_lr": 0.5}


@pytest.fixture
def app(tmp_path, one_thread):
    model, tok = make_tiny_model("llama")
    return Studio(model, tok, model_name="tiny-llama", workdir=tmp_path / "work", edit_config=TINY_EDIT)


def edit(app, target=TARGET, **kw):
    kw = {"paraphrase": "Thomas Mann", "neighbour": "The mother tongue of Pablo Picasso", **kw}
    return app.edit(PROMPT, SUBJECT, target, layers="1", **kw)


def test_predict_and_generate(app):
    top = app.predict(PROMPT)
    assert len(top) == 5 and all(isinstance(t, str) for t, _ in top)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert [t for t, _ in app.predict(PROMPT, k=2)] == [t for t, _ in top[:2]]
    text = app.generate(PROMPT, max_new_tokens=5)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text == app.generate(PROMPT, max_new_tokens=5)  # greedy


def test_trace_plots_and_suggests_a_layer(app):
    steps = []
    view = app.trace(PROMPT, SUBJECT, samples=1, kinds=["mlp", "hidden"], progress=lambda f, d: steps.append((f, d)))
    assert Path(view.plot).is_file() and Path(view.plot).read_bytes()[:4] == b"\x89PNG"
    assert Path(view.plot).parent == app.workdir
    assert 0 <= view.suggested_layer < app.n_layers and view.kind == "mlp"
    assert view.top == app.predict(PROMPT) and view.answer.strip() == view.top[0][0].strip()
    assert f"Suggested layer: **{view.suggested_layer}**" in view.summary()
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and "Causal tracing" in steps[1][1]
    again = app.trace(PROMPT, SUBJECT, samples=1, kinds=["attn"])
    assert again.plot != view.plot and again.kind == "attn"  # a new file: the browser shows the new plot


def test_edit_shows_before_and_after(app):
    base = weights(app.model)
    before = app.predict(PROMPT)
    steps = []
    view = edit(app, progress=lambda f, d: steps.append(d))
    assert view.name == "rome-1" and view.method == "rome" and view.layers == [1]
    assert [r["what"] for r in view.rows] == ["edit prompt", "paraphrase", "neighbour"]
    assert view.rows[0]["before"] == before
    assert view.rows[0]["after"][0][0].strip() == TARGET  # the edit wins the top-1
    assert view.rows[0]["after"] == app.predict(PROMPT)
    assert view.generation_before.startswith(PROMPT) and view.generation_after.startswith(PROMPT)
    assert view.generation_before != view.generation_after
    assert f"now **{TARGET}**" in view.summary()
    table = view.table()
    assert table[0][:2] == ["edit prompt", PROMPT] and table[0][3].startswith(TARGET)
    assert "statistics skipped" in " ".join(steps)
    assert app.edits() == [
        {
            "name": "rome-1",
            "method": "rome",
            "facts": f"{SUBJECT} → {TARGET}",
            "layers": "1",
            "status": "active (merged)",
        }
    ]
    assert not all(torch.equal(base[k], v) for k, v in weights(app.model).items())
    es = hf_knowedit.list_edits(app.model)[0]
    assert es.name == "rome-1"


QUESTION = "What is the mother tongue of Thomas Mann?"


@pytest.mark.parametrize("template", [False, True])
def test_ask_asks_as_the_chat_metrics_do(app, template):
    from hf_knowedit.evaluation import chat

    if template:  # on a copy: the tiny tokenizer is shared by other tests
        app.tokenizer = copy.deepcopy(app.tokenizer)
        app.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    answer = app.ask(f"  {QUESTION} ", max_new_tokens=6)
    assert answer == chat.ask(app.model, app.tokenizer, [QUESTION], max_new_tokens=6)[0]
    assert answer == app.ask(QUESTION, max_new_tokens=6)  # greedy
    with pytest.raises(InvalidRequestError, match="question"):
        app.ask("  ")


def test_edit_asks_the_question_before_and_after(app):
    from hf_knowedit.evaluation.chat import names

    before = app.ask(QUESTION)
    view = edit(app, question=QUESTION)
    assert view.question == QUESTION and view.answer_before == before and view.answer_after == app.ask(QUESTION)
    assert view.answer_names_target is names(view.answer_after, TARGET, subject=SUBJECT)
    assert "Asked as a question, the answer" in view.summary()
    app.revert(view.name)
    blank = edit(app, question=" ")
    assert (blank.question, blank.answer_before, blank.answer_after, blank.answer_names_target) == ("", "", "", None)
    assert "Asked as a question" not in blank.summary()


def test_the_summary_says_whether_the_answer_names_the_target():
    view = studio.EditView("rome-1", "rome", [1], 1.0, [], "", "", "Where?", "Paris.", "Rome, Italy.", "Rome", True)
    assert "the answer names **Rome**" in view.summary()
    view.answer_names_target = False
    assert "the answer does **not** name **Rome**" in view.summary()


def test_edit_config_statistics_and_layers(app, monkeypatch):
    seen = {}
    real = hf_knowedit.apply_edits

    def spy(model, tok, request, method, *, layers, config):
        seen.update(method=method, layers=layers, config=dict(config))
        if config.get("mom2") == "corpus":
            raise InvalidConfigError("stop here: the statistics would take a while")
        return real(model, tok, request, method, layers=layers, config=config)

    monkeypatch.setattr(hf_knowedit, "apply_edits", spy)
    edit(app, method="memit", context_templates=0, v_num_grad_steps=2)
    assert seen["method"] == "memit" and seen["layers"] == [1]
    assert seen["config"] == {**TINY_EDIT, "context_templates": 0, "mom2": "identity", "v_num_grad_steps": 2}
    app.revert("memit-1")
    with pytest.raises(InvalidConfigError, match="stop here"):
        edit(app, stats=STATS_SAMPLED, n_tokens=100)
    assert seen["config"]["mom2"] == "corpus" and seen["config"]["mom2_n_tokens"] == 100
    assert hf_knowedit.list_edits(app.model) == []


def test_disable_enable_keeps_the_stack_order_exactly(app):
    base = weights(app.model)
    a = edit(app).name
    mid = weights(app.model)
    b = app.edit("The mother tongue of Pablo Picasso", "Pablo Picasso", "German", layers="1").name  # same module
    both = weights(app.model)
    edited = logits(app.model, app.tokenizer, PROMPT)

    assert "Disabled **rome-1**" in app.toggle(a)
    assert [r["status"] for r in app.edits()] == ["disabled", "active (merged)"]
    assert [e.name for e in hf_knowedit.list_edits(app.model)] == [b]
    assert app.predict(PROMPT)[0][0].strip() != TARGET
    assert "Enabled **rome-1**" in app.toggle(a)  # back under b, which was computed on top of it
    assert [e.name for e in hf_knowedit.list_edits(app.model)] == [a, b]
    assert all(torch.equal(both[k], v) for k, v in weights(app.model).items())
    torch.testing.assert_close(logits(app.model, app.tokenizer, PROMPT), edited, rtol=0, atol=0)

    app.toggle(b)
    assert all(torch.equal(mid[k], v) for k, v in weights(app.model).items())
    assert app.revert(b) == f"Reverted **{b}**." and [r["name"] for r in app.edits()] == [a]  # a disabled one
    assert app.revert(a) == f"Reverted **{a}**." and app.edits() == []
    assert all(torch.equal(base[k], v) for k, v in weights(app.model).items())


def test_enabling_a_conflicting_edit_is_refused(app):
    a = edit(app).name
    app.toggle(a)
    edit(app, target="German")
    with pytest.raises(EditConflictError, match="already rewrote"):
        app.toggle(a)
    assert [r["status"] for r in app.edits()] == ["disabled", "active (merged)"]


def test_save_push_and_truncate(app, tmp_path, hub):
    name = edit(app).name
    assert f"to `{tmp_path / 'a'}`" in app.save(name, str(tmp_path / "a"))
    es = EditSet.from_pretrained(tmp_path / "a")
    assert es.requests[0].target_new == TARGET and es.deltas[next(iter(es.deltas))].rank == 1
    message = app.save(name, str(tmp_path / "b"), max_rank=1.0)  # gr.Number gives floats
    assert "truncated to rank 1 (largest relative error 0.0000)" in message
    app.toggle(name)
    assert "truncated" not in app.save(name, str(tmp_path / "c"), max_rank=0)  # 0: exact; a disabled one saves too
    assert EditSet.from_pretrained(tmp_path / "c").requests == es.requests
    assert "Pushed **rome-1**" in app.push(name, "studio-edit")
    assert EditSet.from_pretrained(f"{hub.user}/studio-edit").requests == es.requests
    with pytest.raises(InvalidConfigError, match="whole number"):
        app.save(name, str(tmp_path / "d"), max_rank=1.5)
    with pytest.raises(InvalidConfigError, match="not a Hub repo id"):
        app.push(name, "not a repo")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(KnowEditError):
        app.save(name, str(tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_errors_are_the_librarys_typed_errors(app):
    state = weights(app.model)
    with pytest.raises(InvalidRequestError, match="Type a prompt first"):
        app.predict("  ")
    with pytest.raises(SubjectNotFoundError):
        app.trace(PROMPT, "Angola", samples=1)
    with pytest.raises(InvalidConfigError, match="at least one kind"):
        app.trace(PROMPT, SUBJECT, kinds=[])
    with pytest.raises(InvalidRequestError, match="Type the new target first"):
        app.edit(PROMPT, SUBJECT, "")
    with pytest.raises(InvalidConfigError, match="Layers: cannot read"):
        app.edit(PROMPT, SUBJECT, TARGET, layers="one")
    with pytest.raises(KnowEditError, match="out of range"):
        app.edit(PROMPT, SUBJECT, TARGET, layers="99")
    with pytest.raises(InvalidConfigError, match="Unknown method"):
        app.edit(PROMPT, SUBJECT, TARGET, method="nope")
    with pytest.raises(InvalidConfigError, match="positive number"):
        app.edit(PROMPT, SUBJECT, TARGET, stats=STATS_SAMPLED, n_tokens=None)
    with pytest.raises(InvalidRequestError, match="Pick an edit"):
        app.toggle(None)
    with pytest.raises(EditSetNotFoundError, match="none yet"):
        app.revert("rome-7")
    assert app.edits() == [] and all(torch.equal(state[k], v) for k, v in weights(app.model).items())


def test_ui_message_is_one_line_without_traceback():
    assert ui_message(SubjectNotFoundError("Subject 'x' does not occur\n in prompt 'y'.")) == (
        "Subject 'x' does not occur in prompt 'y'."
    )
    assert ui_message(EditSetNotFoundError("No edit named 'a'.")) == "No edit named 'a'."
    assert ui_message(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"
    assert ui_message(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize(
    "text, want",
    [(None, None), ("", None), ("  ", None), (6, [6]), (6.0, [6]), ("6", [6]), ("4-6", [4, 5, 6]), ("1, 3", [1, 3]),
     ("-1", [-1]), ("auto", "auto"), ("AUTO", "auto"), (float("nan"), None)],
)  # fmt: skip
def test_parse_layers(text, want):
    assert parse_layers(text) == want


@pytest.mark.parametrize("text", ["x", "6-4", "4-", "1;2"])
def test_parse_layers_refuses(text):
    with pytest.raises(InvalidConfigError, match="cannot read"):
        parse_layers(text)


def test_labels_are_readable_and_unique():
    assert studio.as_label([(" Paris", 0.5), ("Paris", 0.2), (" ", 0.1)]) == {"Paris": 0.5, "'Paris'": 0.2, "' '": 0.1}
    assert (
        studio.fmt_top([(" Paris", 0.5), (" Rome", 0.25), ("x", 0.001), ("y", 0.01)])
        == "Paris 50.0%, Rome 25.0%, x 0.1%"
    )


# -- the studio subcommand --------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli.common, "load_model", load)


def test_port_in_use_is_one_clear_line_before_the_model_loads(capsys, no_model):
    import gradio  # noqa: F401  (installed by make setup: the [studio] extra)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert studio.port_in_use("127.0.0.1", port)
        code = cli.main(["studio", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"hf-knowedit: error: --port {port}: 127.0.0.1:{port} is already in use (another studio or server?); "
        f"pass another --port, e.g. --port {port + 1}."
    )
    assert not studio.port_in_use("127.0.0.1", studio.free_port())


def test_studio_without_gradio_says_how_to_install(capsys, no_model, monkeypatch):
    real = cli.webui.importlib.util.find_spec
    monkeypatch.setattr(cli.webui.importlib.util, "find_spec", lambda name: None if name == "gradio" else real(name))
    assert cli.main(["studio"]) == 1
    assert "pip install 'hf_knowedit[studio]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "70000"], ["--port", "x"]])
def test_studio_bad_port_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["studio", *argv])
    assert exit_info.value.code == 2 and "port" in capsys.readouterr().err


def test_studio_subcommand_serves_the_loaded_model(monkeypatch, capsys):
    """``hf-knowedit studio --model X`` loads X with the CLI's loader and hands it to :func:`studio.launch`."""
    calls = {}
    monkeypatch.setattr(cli.common, "load_model", lambda args: make_tiny_model("llama"))
    monkeypatch.setattr(cli.webui, "_check_model_arg", lambda args: None)
    monkeypatch.setattr(cli.webui.importlib.util, "find_spec", lambda name: object())

    def fake_launch(app, *, host, port, block, quiet):
        calls.update(app=app, host=host, port=port, block=block)

    monkeypatch.setattr(studio, "launch", fake_launch)
    port = studio.free_port()
    assert cli.main(["studio", "--model", "my/model", "--port", str(port)]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == port and calls["block"] is True
    assert calls["app"].model_name == "my/model" and calls["app"].predict(PROMPT)


# -- packaging: gradio stays out of the core; app.py; the Space's requirements ------------------------


def test_only_the_studio_imports_gradio():
    offenders = []
    for path in sorted((ROOT / "hf_knowedit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "gradio" or n.startswith("gradio.") for n in names) and path.name != "studio.py":
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    code = "import sys, hf_knowedit, hf_knowedit.cli as c; c.build_parser(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_app_py_runs_the_studio_subcommand(monkeypatch):
    import runpy

    module = runpy.run_path(str(ROOT / "app.py"), run_name="not_main")  # importing it starts nothing
    argv = module["studio_argv"]({})
    assert argv[:1] == ["studio"] and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "7860"
    argv = module["studio_argv"](
        {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861", "HF_KNOWEDIT_MODEL": "gpt2"}
    )
    assert argv == ["studio", "--model", "gpt2", "--host", "0.0.0.0", "--port", "7861"]


def test_space_requirements_match_the_package():
    import re

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["studio"]
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    have = {re.split(r"[<>=!~ \[]", ln)[0].lower().replace("_", "-") for ln in lines if ln}
    assert {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-") for d in wanted} <= have
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


def test_gradio_app_builds(app):
    pytest.importorskip("gradio", reason="the studio UI needs gradio: make studio-deps")
    blocks = studio.build_app(app)
    ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    assert {"prompt", "subject", "trace-btn", "heatmap", "edit-btn", "before", "after", "edits", "revert-btn"} <= ids
    assert json.dumps(blocks.config)  # serialisable: what the browser receives


# -- sessions: one model, each browser session its own edits ------------------------------------------


def test_sessions_see_only_their_own_edits(app):
    base = app.predict(PROMPT)
    a = edit(app, session="A")
    assert app.predict(PROMPT, session="A")[0][0].strip() == TARGET
    assert app.predict(PROMPT, session="B") == base  # B's model is the base model
    b = edit(app, target="German", session="B")  # no conflict with A's edit: it is not B's
    assert b.rows[0]["before"] == base  # B's "before" never shows A's edit
    assert b.rows[0]["after"][0][0].strip() == "German"
    assert [r["name"] for r in app.edits(session="B")] == [b.name]
    assert [r["name"] for r in app.edits(session="A")] == [a.name]
    assert [e.name for e in hf_knowedit.list_edits(app.model)] == [a.name]  # B's Apply did not stack on A's
    assert app.predict(PROMPT, session="A") == a.rows[0]["after"]  # A's edit is still active for A
    assert app.predict(PROMPT, session="B") == b.rows[0]["after"]
    assert app.edits() == [] and app.predict(PROMPT) == base  # the default session has none


def test_a_session_cannot_touch_another_sessions_edits(app, tmp_path):
    base = weights(app.model)
    a = edit(app, session="A").name
    edited = weights(app.model)
    for act in (app.toggle, app.revert, lambda n, session: app.save(n, str(tmp_path / "x"), session=session)):
        with pytest.raises(EditSetNotFoundError, match="none yet"):
            act(a, session="B")
    assert not (tmp_path / "x").exists()
    assert all(torch.equal(base[k], v) for k, v in weights(app.model).items())  # B's model: the base model
    assert [r["status"] for r in app.edits(session="A")] == ["active (merged)"]
    assert all(torch.equal(edited[k], v) for k, v in weights(app.model).items())
    assert "Disabled" in app.toggle(a, session="A") and app.predict(PROMPT, session="A") == app.predict(PROMPT)
    assert "Enabled" in app.toggle(a, session="A")
    app.forget("A")  # the tab closed: its edits are dropped and the model is the base model again
    assert hf_knowedit.list_edits(app.model) == [] and app.edits(session="A") == []
    assert all(torch.equal(base[k], v) for k, v in weights(app.model).items())


def test_sets_active_before_the_studio_are_shared_and_kept(tmp_path, one_thread):
    model, tok = make_tiny_model("llama")
    hf_knowedit.apply_edits(model, tok, {"prompt": PROMPT, "subject": SUBJECT, "target_new": TARGET}, "rome",
                            layers=[1], config={**TINY_EDIT, "mom2": "identity"}, name="loaded")  # fmt: skip
    app = Studio(model, tok, workdir=tmp_path, edit_config=TINY_EDIT)
    mine = app.edit("The mother tongue of Pablo Picasso", "Pablo Picasso", "German", layers="1", session="A").name
    assert [(r["name"], r["status"]) for r in app.edits(session="B")] == [
        ("loaded", "shared (active for every session)")
    ]
    assert app.predict(PROMPT, session="B")[0][0].strip() == TARGET
    with pytest.raises(InvalidRequestError, match="acts for every session"):
        app.revert("loaded", session="B")
    assert "Saved **loaded**" in app.save("loaded", str(tmp_path / "shared"), session="B")
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["loaded"]
    app.edits(session="A")
    assert [e.name for e in hf_knowedit.list_edits(model)] == ["loaded", mine]


def test_trace_suggests_a_layer_but_the_edit_keeps_the_default(app):
    from hf_knowedit.methods.rome import default_layer

    view = app.trace(PROMPT, SUBJECT, samples=1, kinds=["mlp"])
    assert view.default_layer == default_layer(app.model)
    assert f"ROME edits its measured default layer {view.default_layer}" in view.summary()
    assert "it is now in *Layer(s)*" not in view.summary()


def test_the_app_gives_each_browser_session_its_own_edits(app):
    """Two gradio clients (two sessions) on the served app: one's edit is not the other's."""
    pytest.importorskip("gradio", reason="the studio UI needs gradio: make studio-deps")
    from gradio_client import Client

    blocks, url = studio.launch(app, port=studio.free_port(), block=False, quiet=True)
    try:
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        base = a.predict(PROMPT, api_name="/on_predict")["label"]
        out = a.predict(PROMPT, SUBJECT, TARGET, "rome", "1", studio.STATS_IDENTITY, 10, 0, "", "", QUESTION,
                        api_name="/on_edit")  # fmt: skip
        assert out[2]["label"] == TARGET and out[8]["data"][0][0] == "rome-1"
        assert out[7] == app.ask(QUESTION, session=next(iter(app.sessions)))  # the answer after the edit
        assert b.predict(PROMPT, api_name="/on_predict")["label"] == base
        assert a.predict(PROMPT, api_name="/on_predict")["label"] == TARGET
        assert b.predict(api_name="/on_load")[0]["data"] in ([], [[]], [["", "", "", "", ""]])
        assert len(app.sessions) == 2 and all(len(s.sets) == (1 if s.sets else 0) for s in app.sessions.values())
    finally:
        blocks.close()
