"""`perft inspect-routing` on tiny models of every family: counts add up, "before" is the frozen model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_checkpoint
from typer.testing import CliRunner

from perft_cli.arch import FAMILIES
from perft_cli.cli import app
from perft_cli.errors import PerftError
from perft_cli.inspect_routing import inspect
from perft_cli.prompts import train_prompt
from perft_cli.routing_report import print_report
from perft_cli.routing_report.counting import find_alarms, layer_report

RECORDS = [
    {"instruction": f"What is {i} times {i + 3}? Think step by step.", "input": "", "output": f"It is {i * (i + 3)}."}
    for i in range(4)
]
CUTOFF = 64  # tokens per example (byte tokenizer): 4 x 64 tokens keep each routing pass cheap on 2 CPU cores


def checkpoint(path, model_dir, variant: str, **recipe_data):
    """make_checkpoint, with the recipe's data section cut short (and anything else given)."""
    ckpt = make_checkpoint(path, model_dir, variant)
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    recipe["data"].update(cutoff_len=CUTOFF, **recipe_data)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ckpt


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("routing-data") / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


@torch.no_grad()
def frozen_counts(model_dir, cutoff_len: int = CUTOFF) -> tuple[dict[int, torch.Tensor], int]:
    """Each MoE layer's top-k load on RECORDS by plain transformers, no perft code: hooks on the routers, bincount."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = []
    for r in RECORDS:
        ids = tok(train_prompt(r["instruction"], r["input"], r["output"]), truncation=True, max_length=cutoff_len)
        ids = ids["input_ids"]
        seqs.append(ids + [tok.eos_token_id] if len(ids) < cutoff_len else ids)  # EOS when it fits, as training
    width = max(map(len, seqs))
    input_ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])  # [B, S] right padding
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [B, S]
    family = FAMILIES[model.config.model_type]
    seen, counts, num_experts, hooks = {}, {}, {}, []
    for i, layer in enumerate(model.model.layers):
        router = getattr(getattr(layer, family.block_attr), family.router_attr, None)
        if router is not None:
            num_experts[i] = router.num_experts
            hooks.append(router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2])))
    model(input_ids=input_ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()  # [T]
    for i, index in seen.items():  # index: [T, k] the router's own top-k
        counts[i] = torch.bincount(index[real].reshape(-1), minlength=num_experts[i])  # [E]
    return counts, int(real.sum())


def check_report(report: dict, model_dir) -> None:
    """Counts add up to tokens x top-k per layer; "before" equals the frozen model's own routing."""
    frozen, tokens = frozen_counts(model_dir)
    assert report["tokens"] == tokens and report["examples"] == len(RECORDS)
    assert [r["layer"] for r in report["layers"]] == sorted(frozen)
    for rep in report["layers"]:
        k = rep["top_k"]
        assert rep["tokens"] == tokens
        assert sum(rep["before"]["counts"]) == sum(rep["after"]["counts"]) == tokens * k
        assert rep["before"]["counts"] == frozen[rep["layer"]].tolist()
        assert abs(sum(rep["after"]["shares"]) - 1) < 1e-9
        if rep["perft"] is not None:
            kk = rep["perft"]["top_k"]
            assert sum(rep["perft"]["counts"]) == tokens * kk
            cooc = torch.tensor(rep["cooccurrence"])  # [N, E]
            assert cooc.sum() == tokens * kk * k
            assert (cooc.sum(1) == torch.tensor(rep["perft"]["counts"]) * k).all()  # each PEFT pick meets k base
            assert (cooc.sum(0) == torch.tensor(rep["after"]["counts"]) * kk).all()  # ... and K PEFT picks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_every_family(family, tiny_model_dir, data_file, tmp_path):
    model_dir = tiny_model_dir(family)
    report = inspect(checkpoint(tmp_path / "ckpt", model_dir, "perft-r"), data=data_file, progress=False)
    check_report(report, model_dir)
    first = report["layers"][0]
    # PERFT adds after the MoE block: the first MoE layer's input, hence its base routing, cannot change.
    assert first["after"]["counts"] == first["before"]["counts"] and first["changed_tokens"] == 0
    assert report["perft_num_experts"] == 4 and report["perft_top_k"] == 2
    json.dumps(report)  # every number is JSON-serialisable


@pytest.mark.parametrize("variant", ["lora", "perft-e", "perft-d"])
def test_counts_other_variants(variant, tiny_model_dir, data_file, tmp_path):
    model_dir = tiny_model_dir("olmoe")
    report = inspect(checkpoint(tmp_path / "ckpt", model_dir, variant), data=data_file, progress=False)
    check_report(report, model_dir)
    assert report["perft_num_experts"] is None and all(r["cooccurrence"] is None for r in report["layers"])
    if variant == "lora":  # attention changes in every layer: the first MoE layer's routing moves too
        assert report["layers"][0]["changed_tokens"] > 0


def test_default_data_is_the_validation_split(tiny_model_dir, data_file, tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-r", train=str(data_file), val_size=2)
    report = inspect(ckpt, progress=False)
    assert report["examples"] == 2 and "validation split" in report["data"]
    assert inspect(ckpt, limit=1, progress=False)["examples"] == 1


def test_missing_data_is_one_line_error(tiny_model_dir, tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-r")
    result = CliRunner().invoke(app, ["inspect-routing", "--ckpt", str(ckpt)])
    assert result.exit_code == 1
    assert "data.train" in result.output and "Traceback" not in result.output
    assert "pass the examples to route with --data FILE" in result.output  # there is no --set to change data.train


def _no_model(monkeypatch):
    """Loading the model now fails the test: the error must come before the (slow) model load."""
    import perft_cli.modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_trained", refuse)


@pytest.mark.parametrize("where", ["--data", "data.train"])
def test_missing_data_file_advice_is_data_option(where, tiny_model_dir, tmp_path, monkeypatch):
    """The fix is --data FILE, never "check data.train" (inspect-routing has no --set); said before the model loads."""
    missing = tmp_path / "nope.json"
    ckpt = checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-r", train=str(missing))
    _no_model(monkeypatch)
    args = ["inspect-routing", "--ckpt", str(ckpt)] + (["--data", str(missing)] if where == "--data" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "check data.train" not in result.output and "--data" in result.output
    if where == "--data":
        assert f"--data {str(missing)!r} not found; pass a JSON or JSONL file" in result.output
    else:
        assert f"the run's training data {str(missing)!r} (data.train in {ckpt / 'recipe.yaml'}) not found" in (
            result.output
        )


@pytest.mark.parametrize(
    "outputs,message",
    [
        (["--json", "{tmp}/adir"], "--json '{tmp}/adir' is a folder; it names the file to write"),
        (["--json", "{tmp}/new/r.json", "--html", "{tmp}/afile.txt/r.html"], "--html '{tmp}/afile.txt/r.html' cannot"),
        (["--png", "{tmp}/afile.txt/sub/r.png"], "'{tmp}/afile.txt' is a file, not a folder; choose another path"),
        (["--png", "{tmp}/r.xyz"], "--png '{tmp}/r.xyz': matplotlib cannot write .xyz files; end the name in .png"),
        (["--json", "{tmp}/r.out", "--html", "{tmp}/r.out"], "--json and --html name the same file"),
    ],
)
def test_bad_output_paths_fail_before_the_model_loads(outputs, message, tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.txt").write_text("hi")
    before = sorted(tmp_path.rglob("*"))
    _no_model(monkeypatch)
    args = ["inspect-routing", "--ckpt", str(tmp_path), *(a.format(tmp=tmp_path) for a in outputs)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert message.format(tmp=tmp_path) in result.output
    assert sorted(tmp_path.rglob("*")) == before  # in particular, --json is not written when --html cannot be


def test_outputs_are_written_all_or_none(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A rendering that fails after the routing pass leaves none of the files (nor their temporary files)."""
    from perft_cli import routing_report

    ckpt = checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-s")

    def broken(*args, **kwargs):
        raise PerftError("the figure could not be drawn")

    monkeypatch.setattr(routing_report, "render_png", broken)
    out = tmp_path / "out"
    files = ["--json", str(out / "r.json"), "--html", str(out / "r.html"), "--png", str(out / "r.png")]
    args = ["inspect-routing", "--ckpt", str(ckpt), "--data", str(data_file), "--limit", "1", *files]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "the figure could not be drawn" in result.output
    assert not out.exists()


def test_merged_lora_output_is_not_a_checkpoint(tmp_path, monkeypatch):
    """A `perft merge` LoRA output has no adapters to compare: say so and name its run, not "has the run saved"."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "perft-merge.json").write_text(json.dumps({"variant": "lora", "folded": True, "checkpoint": "runs/x"}))
    _no_model(monkeypatch)
    result = CliRunner().invoke(app, ["inspect-routing", "--ckpt", str(out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "is a merged LoRA model written by perft merge" in result.output and "'runs/x'" in result.output
    assert "has the run saved yet" not in result.output


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, data_file, tmp_path_factory):
    """`perft inspect-routing` through the CLI on a run directory, writing all three files."""
    root = tmp_path_factory.mktemp("routing-cli")
    checkpoint(root / "run" / "checkpoints" / "step-00000001", tiny_model_dir("qwen2_moe"), "perft-r")
    (root / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # as training left it
    files = {ext: root / f"routing.{ext}" for ext in ("json", "html", "png")}
    args = ["inspect-routing", "--ckpt", str(root / "run"), "--data", str(data_file), "--limit", "3"]
    args += [x for ext, path in files.items() for x in (f"--{ext}", str(path))]
    return CliRunner().invoke(app, args, env={"COLUMNS": "120"}), files


def test_cli_writes_json_html_png(cli_run):
    result, files = cli_run
    assert result.exit_code == 0, result.output
    assert "per-layer summary" in result.output and "PERFT router" in result.output
    report = json.loads(files["json"].read_text())
    assert report["examples"] == 3 and len(report["layers"]) == 2
    assert {"counts", "shares", "stats"} <= set(report["layers"][0]["after"]) and "alarms" in report
    assert files["png"].stat().st_size > 10_000
    page = files["html"].read_text()
    assert "<svg" in page and "<script" not in page and "https://" not in page and "@import" not in page
    lines = [json.loads(x) for x in (files["json"].parent / "run" / "metrics.jsonl").read_text().splitlines()]
    event = lines[-1]  # the run's log gets the routing numbers beside its losses
    assert (event["event"], event["step"], event["checkpoint"]) == ("routing", 1, "step-00000001")
    assert [x["layer"] for x in event["layers"]] == [r["layer"] for r in report["layers"]]
    assert event["layers"][0]["changed_tokens"] == round(report["layers"][0]["changed_tokens"], 4)
    assert {"base_util_median", "base_dead_fraction", "base_util_median_before"} <= set(event["layers"][0])


def test_png_without_matplotlib_is_one_line_error(monkeypatch, tmp_path):
    from perft_cli import routing_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(PerftError, match=r"pip install 'perft-cli\[plot\]'"):
        routing_report.require_matplotlib()
    # Checked before any model is loaded; the brackets survive rich's markup.
    args = ["inspect-routing", "--ckpt", str(tmp_path), "--png", str(tmp_path / "x.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "pip install 'perft-cli[plot]'" in result.output


def synthetic_report(layers: int, experts: int, perft_n: int | None = None, seed: int = 0) -> dict:
    """A report built from random counts (no model), for the renderers and the alarm rules."""
    g = torch.Generator().manual_seed(seed)
    tokens, k = 1000, 8
    reps = []
    for layer in range(layers):

        def load(n, kk):
            probs = torch.rand(n, generator=g) ** 3  # uneven, so some layers raise alarms
            return torch.bincount(torch.multinomial(probs, tokens * kk, True, generator=g), minlength=n)

        a, b = load(experts, k), load(experts, k)
        sets = torch.zeros(tokens, k, dtype=torch.int16)
        after = {"counts": {layer: a}, "sets": {layer: sets}, "perft": {}, "cooc": {}}
        if perft_n:
            after["perft"][layer] = load(perft_n, 2)
            after["cooc"][layer] = torch.randint(0, 50, (perft_n, experts), generator=g)
        before = {"counts": {layer: b}, "sets": {layer: sets}}
        reps.append(layer_report(layer, f"model.layers.{layer}.mlp", k, after, before, 2 if perft_n else None))
    return {
        "checkpoint": "ckpt",
        "model": "synthetic",
        "family": "olmoe",
        "variant": "perft-r" if perft_n else "perft-e",
        "data": "random counts",
        "examples": 10,
        "tokens": tokens,
        "cutoff_len": 256,
        "moe_layers": layers,
        "base_num_experts": experts,
        "top_k": k,
        "perft_num_experts": perft_n,
        "perft_top_k": 2 if perft_n else None,
        "collapse_share": 0.5,
        "base_collapse_factor": 3.0,
        "layers": reps,
        "alarms": find_alarms(reps, 0.5),
    }


def load(counts: list[int]) -> dict:
    return {"counts": counts, "shares": [c / sum(counts) for c in counts]}


def test_alarms():
    report = synthetic_report(2, 8, perft_n=4)
    layer0, layer1 = report["layers"]
    layer1["perft"].update(load([1800, 100, 100, 0]))
    layer0["before"].update(load([125] * 8))
    layer0["after"].update(load([400, 100, 100, 100, 100, 100, 100, 0]))  # 40% > 3 x 1/8
    alarms = find_alarms(report["layers"], collapse_share=0.5)
    kinds = {(a["layer"], a["router"], a["kind"]) for a in alarms}
    assert {(1, "perft", "collapse"), (1, "perft", "dead"), (0, "base", "collapse"), (0, "base", "dead")} <= kinds
    assert next(a for a in alarms if a["router"] == "perft" and a["kind"] == "dead")["experts"] == [3]
    assert "12.5% before fine-tuning" in next(a for a in alarms if a["router"] == "base")["message"]
    relaxed = find_alarms(report["layers"], collapse_share=0.95)
    assert not any(a["router"] == "perft" and a["kind"] == "collapse" for a in relaxed)
    # An uneven load the frozen model already had is not an alarm; only what the fine-tuned model does.
    layer0["before"], layer0["after"] = layer0["after"], layer0["before"]
    assert not [a for a in find_alarms(report["layers"][:1], collapse_share=0.5) if a["router"] == "base"]


def test_terminal_rule_for_many_layers(capsys):
    """64 experts x 16 layers: grids + summary, histograms only for layers with alarms (at most 3)."""
    from perft_cli import console

    report = synthetic_report(16, 64)
    console.out.width = 120
    print_report(report)
    text = capsys.readouterr().out
    assert "histograms: 3 of 16 layers shown" in text
    assert text.count("base router load") == 3 and "per-layer summary" in text
    assert len(text.splitlines()) < 200  # 16 full histograms would add ~300 lines (> 1,000 as rows per expert)


BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.mark.skipif(
    not any(shutil.which(b) for b in BROWSERS),
    reason="no chromium binary found (apt-get install -y chromium) to render the HTML report headless",
)
def test_html_renders_in_headless_chromium(cli_run, tmp_path):
    import matplotlib.image

    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900"]
    subprocess.run([*cmd, cli_run[1]["html"].as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (900, 1200) and float(pixels.std()) > 0.05  # not blank
    purple = torch.tensor([0x5E, 0x3C, 0x99]) / 255  # the "after" bars of the histograms (no heat-map cell has it)
    close = (torch.from_numpy(pixels.copy()) - purple).abs().amax(-1) < 0.03  # [H, W]
    assert int(close.sum()) > 500, "no histogram bars visible in the screenshot"


def test_load_stats_carry_nemos_utilisation_quartiles_and_dead_fraction():
    from perft_cli.perft import load_stats

    s = load_stats(torch.tensor([4, 0, 2, 2]))  # shares 1/2, 0, 1/4, 1/4 of 4 experts: utilisation 2, 0, 1, 1
    assert (s["util_p25"], s["util_median"], s["util_p75"]) == pytest.approx((0.75, 1.0, 1.25))
    assert s["dead_fraction"] == 0.25 and s["dead"] == 1
    uniform = load_stats(torch.tensor([3, 3, 3]))
    assert uniform["util_p25"] == uniform["util_p75"] == pytest.approx(1.0) and uniform["dead_fraction"] == 0.0
