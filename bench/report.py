"""Regenerates the README's benchmark table from bench/results/*.json. Run: python bench/report.py"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
STEER_START, STEER_END = "<!-- steering-compare:start -->", "<!-- steering-compare:end -->"
LOOP_START, LOOP_END = "<!-- closed-loop:start -->", "<!-- closed-loop:end -->"
SERVING_START, SERVING_END = "<!-- serving:start -->", "<!-- serving:end -->"


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _decay_steering(r):
    score = r.get("steering_positive_share")
    if not score:
        return ""
    return f"; implied share of positive SmolLM2 reviews {min(score):.2f} to {max(score):.2f}, back to {score[-1]:.2f} after 300 s"


def _env(r):
    """The environment a result's command ran under, when it is not the TensorFlow default."""
    return f"KERAS_BACKEND={r['backend']} " if r.get("backend", "tensorflow") != "tensorflow" else ""


def _generation_row(r, flag):
    mode = "graph" if "graph" in r else "xla"
    g, t = r[mode], r[mode]["times"]
    tps = {k: v["tokens_per_s"] for k, v in t.items()}
    return (
        f"| steered generation, {r['model']}, {r['new_tokens']} new tokens ({r['device']}{', XLA' if mode == 'xla' else ''}) | tokens/s at "
        f"batch 1: base {tps['base b1']:.1f}, unmerged with a control {tps['unmerged b1']:.1f} ({g['unmerged_vs_base_tokens_per_s']['b1']:.3f}x), "
        f"merged {tps['merged b1']:.1f}; batch 8: base {tps['base b8']:.1f}, one control {tps['unmerged b8']:.1f} "
        f"({g['unmerged_vs_base_tokens_per_s']['b8']:.3f}x), 8 controls {tps['mixed b8']:.1f} ({g['mixed_vs_single_control_tokens_per_s']:.3f}x "
        f"one), per-adapter way (8 merged models x batch 1) {tps['per-adapter 8 x b1']:.1f}: mixed batch "
        f"{g['mixed_batch_vs_per_adapter_speedup']:.1f}x"
        + (f"; XLA vs graph (ours, batch 1) {r['xla_vs_graph_tokens_per_s']['unmerged b1']:.2f}x" if "xla_vs_graph_tokens_per_s" in r else "")
        + (f"; neutral control = base: {g['neutral_control_text_equals_base']}" if "neutral_control_text_equals_base" in g else "")
        + f" | >= 0.97x base; >= 0.97x one control; >= 4x per-adapter | `{_env(r)}python bench/generation.py{flag}` |")


def table():
    lines = ["| benchmark | result | goal | command |", "|---|---|---|---|"]
    if (r := load("exactness")):
        worst = max(v["max_abs_diff"] for v in r["families"].values())
        lines.append(f"| exactness at insertion, {len(r['families'])} families (all-linear) | max abs diff {worst} | 0.0 | `python bench/exactness.py` |")
    if (r := load("exactness_gpu")):
        worst = max(v["max_abs_diff"] for v in r["families"].values())
        lines.append(f"| exactness at insertion on a GPU, {len(r['families'])} families ({r['device']}) | max abs diff {worst} | 0.0 | "
                     f"`{_env(r)}python bench/exactness.py --out exactness_gpu` |")
    for name, flag in (("train_step", ""), ("train_step_smollm2", " --smollm2"), ("train_step_gpu", " --out train_step_gpu"),
                       ("train_step_smollm2_gpu", " --smollm2 --out train_step_smollm2_gpu"),
                       ("train_step_smollm2_jax_cpu", " --smollm2 --out train_step_smollm2_jax_cpu")):
        if (r := load(name)):
            s = r["steps"]
            lines.append(
                f"| train step, {r['model']}, batch {r['batch']} x {r['sequence_length']} ({r['device']}) | ours {s['bias_injection']['median_ms']:.0f} ms, "
                f"KerasHub LoRA {s['keras_lora']['median_ms']:.0f} ms, full {s['full']['median_ms']:.0f} ms; ratio vs LoRA "
                f"{r['ratio_vs_keras_lora']:.3f}, vs full {r['ratio_vs_full']:.3f}"
                + (f"; XLA (jit_compile=True) speed-up: LoRA {r['xla_speedup']['keras_lora']:.2f}x, ours {r['xla_speedup']['bias_injection']:.2f}x, "
                   f"ours vs LoRA under XLA {r['xla_ratio_vs_keras_lora']:.3f}" if "xla_speedup" in r else "")
                + f" | <= 1.05, <= 0.75 | `{_env(r)}python bench/train_step.py{flag}{' --xla' if 'xla_speedup' in r else ''}` |")
    if (r := load("inference")):
        f = r["forward"]
        lines.append(
            f"| forward, {r['model']}, batch {r['batch']} x {r['sequence_length']} ({r['device']}) | base {f['base']['median_ms']:.1f} ms, unmerged "
            f"{f['unmerged']['median_ms']:.1f} ms ({r['ratio_unmerged_vs_base']:.3f}x), merged {f['merged']['median_ms']:.1f} ms "
            f"({r['ratio_merged_vs_base']:.3f}x) | <= 1.10, <= 1.01 | `python bench/inference.py` |")
    for name, flag in (("generation", " --xla"), ("generation_gpu", " --xla-only --out generation_gpu")):
        if (r := load(name)):
            lines.append(_generation_row(r, flag))
    if (r := load("quantized")):
        t, p = r["times"], r["austen_perplexity"]
        lines.append(
            f"| int8 base, SmolLM2-135M, batch 1, {r['new_tokens']} new tokens ({r['device']}) | tokens/s: fp32 {t['fp32 base']['tokens_per_s']:.1f}, "
            f"int8 {t['int8 base']['tokens_per_s']:.1f} ({r['int8_vs_fp32_tokens_per_s']:.2f}x), int8 with a control "
            f"{t['int8 + control']['tokens_per_s']:.1f} ({r['int8_with_control_vs_fp32_tokens_per_s']:.2f}x)"
            + (f", bf16 {t['bf16 base']['tokens_per_s']:.1f} ({r['bf16_vs_fp32_tokens_per_s']:.2f}x), bf16 with a control "
               f"{t['bf16 + control']['tokens_per_s']:.1f} ({r['bf16_with_control_vs_fp32_tokens_per_s']:.2f}x)" if "bf16 base" in t else "")
            + f"; Austen perplexity fp32 "
            f"{p['fp32 base']:.2f}, int8 {p['int8 base']:.2f} ({r['int8_vs_fp32_perplexity']:.3f}x), int8 at the neutral control "
            f"{p['int8 + adapters, neutral control']:.2f}"
            + (f", bf16 {p['bf16 base']:.2f} ({r['bf16_vs_fp32_perplexity']:.3f}x), bf16 at the neutral control "
               f"{p['bf16 + adapters, neutral control']:.2f}" if "bf16 base" in p else "")
            + ("; " + ", ".join(f"{k} {v:.2f}" for k, v in r["int8_variants_perplexity"].items()) if "int8_variants_perplexity" in r else "")
            + (f"; one 576 -> 1536 projection per token: fp32 {r['profile_us_per_call']['float32 layer']:.0f} us, bf16 "
               f"{r['profile_us_per_call']['bfloat16 layer']:.0f} us, int8 {r['profile_us_per_call']['int8 layer']:.0f} us" if "profile_us_per_call" in r else "")
            + " | >= 2x; <= 1.03x | `python bench/quantized.py` |")
    if (r := load("quantized_training")):
        q = r["summary"]
        lines.append(
            f"| training on an int8 base, {r['recipe']}, seeds {', '.join(map(str, r['seeds']))} ({r['device']}) | memory during fit above the "
            f"runtime: fp32 LoRA {q['keras_lora fp32']['training_mb_median']:.0f} MB, int8 LoRA {q['keras_lora int8']['training_mb_median']:.0f} MB, "
            f"int8 ours {q['bias_injection int8']['training_mb_median']:.0f} MB ({r['memory_vs_fp32_lora']:.2f}x fp32 LoRA); accuracy fp32 LoRA "
            f"{q['keras_lora fp32']['accuracy_mean']:.4f}, int8 LoRA {q['keras_lora int8']['accuracy_mean']:.4f}, int8 ours "
            f"{q['bias_injection int8']['accuracy_mean']:.4f} (95% interval {q['bias_injection int8']['accuracy_wilson_95_seed_pool'][0]:.3f}-"
            f"{q['bias_injection int8']['accuracy_wilson_95_seed_pool'][1]:.3f}; {r['accuracy_points_vs_fp32_lora']:+.1f} points) | <= 0.6x; within 1 point | "
            f"`python bench/quantized_training.py` |")
    if (r := load("fit_time")):
        m = r["median"]
        lines.append(
            f"| whole fit, {r['recipe']} ({r['train_examples']} reviews), {r['pairs']} pairs of fresh processes ({r['device']}) | ours "
            f"{m['bias_injection']['fit_s']:.0f} s, KerasHub LoRA {m['keras_lora']['fit_s']:.0f} s: {r['fit_ratio_median']:.3f}x (pairs "
            f"{', '.join(f'{x:.2f}' for x in r['fit_ratio_per_pair'])}); first step {r['first_step_ratio']:.2f}x, steady step "
            f"{r['steady_step_ratio']:.3f}x"
            + (f"; CPU time {r['fit_cpu_ratio_median']:.3f}x; stalls over 5 s: ours {sum(map(len, r['stalls']['bias_injection']))}, "
               f"LoRA {sum(map(len, r['stalls']['keras_lora']))}" if "stalls" in r else "")
            + " | <= 1.05x | `python bench/fit_time.py` |")
    if (r := load("memory")):
        m = r["runs"]
        lines.append(
            f"| peak memory of training, {r['model']}, batch {r['batch']} x {r['sequence_length']} | above the TF runtime: ours "
            f"{m['bias_injection']['training_mb']:.0f} MB, KerasHub LoRA {m['keras_lora']['training_mb']:.0f} MB"
            + (f", LoRA with its optimizer built first {m['keras_lora built']['training_mb']:.0f} MB" if "keras_lora built" in m else "")
            + f", full {m['full']['training_mb']:.0f} MB ({r['ratio_training_mb_vs_full']:.2f}x full"
            + (f", {r['ratio_training_mb_vs_keras_lora']:.3f}x LoRA" if "rounds" in r else "")
            + (f", {r['ratio_training_mb_vs_keras_lora_built']:.3f}x LoRA built first" if "keras_lora built" in m else "")
            + (f"; medians of {r['rounds']} rounds" if "rounds" in r else "")
            + f") | {'<= 1.03x LoRA' if 'rounds' in r else ''} | `python bench/memory.py` |")
    if (r := load("memory_smollm2")):
        t, i, g, w = r["median_above_runtime_mb"]["training"], r["median_above_runtime_mb"]["inference"], r["inference_generating_mb"], r["inference_model_mb"]
        trace = r.get("trace")
        lines.append(
            f"| peak memory, {r['model']}, medians of {r['rounds']} rounds | training ({r['training']}): ours {t['bias_injection']:.0f} MB, KerasHub "
            f"LoRA {t['keras_lora']:.0f} MB ({r['ratio_training_vs_keras_lora']:.3f}x)"
            + (f", LoRA with its optimizer built first {t['keras_lora built']:.0f} MB ({r['ratio_training_vs_keras_lora_built']:.3f}x)"
               if "keras_lora built" in t else "")
            + f"; inference ({r['inference']}): base {i['base']:.0f} MB, ours "
            f"unmerged {i['bias_injection']:.0f} MB ({r['ratio_inference_unmerged_vs_base']:.3f}x); generating alone adds: base {g['base']:.0f} MB, "
            f"unmerged {g['bias_injection']:.0f} MB ({r['ratio_generating_unmerged_vs_base']:.2f}x), merged {g['bias_injection merged']:.0f} MB "
            f"({r['ratio_generating_merged_vs_base']:.2f}x); loaded model: base {w['base']:.0f} MB, ours {w['bias_injection']:.0f} MB"
            + (f"; one traced training step: {trace['bias_injection']['ops']:,} ops against LoRA's {trace['keras_lora']['ops']:,}, tracing adds "
               f"{trace['bias_injection']['tracing_mb']:.0f} MB against {trace['keras_lora']['tracing_mb']:.0f}" if trace else "")
            + (f" (more ops per adapter: " + ", ".join(f"{k} {v:.0f}" for k, v in trace["more_ops_per_adapter"].items()) + ")"
               if trace and "more_ops_per_adapter" in trace else "")
            + " | <= 1.03x | `python bench/memory.py --smollm2` |")
    if (r := load("quality")):
        majority = "/".join(f"{m:.3f}" for m in r.get("majority_baseline", []))
        for name, q in r["accuracy"].items():
            f1 = r.get("macro_f1", {}).get(name)
            extra = f"; macro-F1 {f1['mean']:.3f}" if f1 else ""
            lines.append(f"| quality, {r['model']} on Fine Foods ({r['train_examples']} reviews, {r['epochs']} epochs, 3 seeds; majority "
                         f"answer {majority}): {name} | accuracy {q['mean']:.4f} +/- {q['stdev']:.4f}{extra} | | "
                         f"`python bench/quality.py{' --full' if name.startswith('full') else ''}` |")
    if (r := load("steering")):
        st = r["steering"]
        shares = ", ".join(f"{c:+g}: {s:.2f}" for c, s in zip(st["controls"], st["positive_share"]))
        lines.append(f"| steering, {r['lm']}: share judged positive by control | {shares}; base {st['base_positive_share']:.2f}; "
                     f"neutral = base: {st['neutral_equals_base']} (`bench/results/steering.png`) | | `python bench/steering.py` |")
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in r["austen_perplexity"].items())
        lines.append(f"| forgetting, Austen perplexity ({r['austen_paragraphs']} held-out paragraphs) | {ppl} | | `python bench/steering.py` |")
    if (r := load("steering_int8")):
        a = r["against_fp32"]
        points = ", ".join(f"{p['control']:+g}: {p['int8']:.2f} (fp32 {p['fp32']:.2f}, {p['fp32_wilson_95'][0]:.2f}-{p['fp32_wilson_95'][1]:.2f})"
                           for p in a["points"])
        lines.append(f"| steering on an int8 base, {r['lm']}: share judged positive by control (fp32 curve, its 95% interval) | {points}; "
                     f"all within: {a['all_within']}; neutral = int8 base: {r['steering']['neutral_equals_base']}; Austen perplexity "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["austen_perplexity"].items())
                     + " | within the fp32 curve's interval | `python bench/steering.py --quantize int8` |")
    if (r := load("int8_gradient")):
        rows = "; ".join(f"{name}: " + ", ".join(f"{k} {v['cosine']:.2f}" for k, v in kinds.items())
                         for name, kinds in r["against_float32"].items())
        lines.append(f"| int8 base, SmolLM2: cosine of the adapters' gradient with float32's | {rows} | | `python bench/int8_gradient.py` |")
    if (r := load("steering_compare")):
        g = r["goals"]

        def span(pair):
            return "none within the limit" if pair[0] is None else f"{pair[0]:.2f} to {pair[1]:.2f}"

        lines.append(
            f"| steering compared, {r['lm']} ({r['prompts']} generations per point; table and plot below) | within 1.2x the base's "
            f"fluency: ours {span(g['ours_span_within_fluency_limit'])}, steering vector {span(g['steering_vector_span_within_fluency_limit'])}; "
            f"prompting swing {g['prompting_swing']:.2f}, ours {(g['ours_swing'] or 0.0):.2f} | <= 0.2 to >= 0.8 at <= 1.2x fluency; "
            f"swing >= prompting's | `python bench/steering_compare.py` |")
    if (r := load("closed_loop")):
        t, h = r["summary"]["targets"], r["head"]
        tracked = ", ".join(f"target {v['target']:.2f}: {v['closed_mean_share']:.2f}" for v in t.values())
        lines.append(
            f"| closed loop, {r['lm']} (own feedback head; last 10 of {r['turns']} turns x {r['prompts_per_turn']}; table and plot below) "
            f"| {tracked}; open loop neutral {r['summary']['open_loop_neutral_share']:.2f}; head agrees with the judge on "
            f"{h['agreement_with_judge']:.2f} of 128 | within 0.1 of each target | `python bench/closed_loop.py` |")
    if (r := load("serving")):
        for model, label in (("minilm", "MiniLM `:classify`"), ("smollm2", "SmolLM2 `:generate`, 16 new tokens")):
            runs, summary = r["runs"], r["summary"][model]

            def at(batched, clients, distinct, runs=runs, model=model):
                return runs[f"{model} {'batched' if batched else 'unbatched'} {clients} clients {'16 controls' if distinct else '1 control'}"]

            u, b, b16 = at(False, 16, False), at(True, 16, False), at(True, 16, True)
            ceiling = r.get("signature_ceiling", {}).get(model)
            lines.append(
                f"| serving, {label}, 16 clients ({r['device']}) | unbatched {u['requests_per_s']:.1f} req/s (p50 {u['p50_ms']:.0f} ms, "
                f"p99 {u['p99_ms']:.0f} ms), batched {b['requests_per_s']:.1f} req/s (p50 {b['p50_ms']:.0f}, p99 {b['p99_ms']:.0f}): "
                f"{summary['batched_vs_unbatched_rps_16_clients']['1 control']:.2f}x; 16 distinct controls "
                f"{b16['requests_per_s']:.1f} req/s ({summary['distinct_vs_one_control_rps_16_clients_batched']:.2f}x one); batched = "
                f"unbatched within {summary['max_abs_diff_batched_vs_unbatched']:g}"
                + (f"; the signature alone: batch 16 gives {ceiling['batch 16 vs batch 1 rows_per_s']:.1f}x the rows/s of batch 1" if ceiling else "")
                + " | >= 3x; >= 0.9x; <= 1e-5 | `python bench/serving.py` |")
    if (r := load("size")):
        for name, m in r["models"].items():
            lines.append(
                f"| adapter size, {name}, rank {r['rank']} {r['targets']} | {m['trainable_params']:,} of {m['base_params']:,} params "
                f"({100 * m['trainable_share']:.2f}%), {m['adapter_folder_bytes'] / 1e6:.1f} MB of {m['base_weight_bytes'] / 1e6:.0f} MB | | `python bench/size.py` |")
    if (r := load("decay")):
        lines.append(f"| decay, half-life {r['half_life_s']:.0f} s | measured half-life {r['measured_half_life_s']:.0f} s, max error vs 2^(-t/h) "
                     f"{r['max_abs_error_vs_formula']:.1e}{_decay_steering(r)} (`bench/results/decay.png`) | exact | `python bench/decay.py` |")
    return "\n".join(lines)


def steering_table():
    """One row per point of bench/steering_compare.py, in the order they were measured."""
    r = load("steering_compare")
    if r is None:
        return ""
    base = r["points"]["base"]["fluency_perplexity"]
    lines = ["| method | share judged positive (95% CI) | fluency: perplexity under the base (x base) | distinct-2 | Austen perplexity |",
             "|---|---|---|---|---|"]
    for name, p in r["points"].items():
        low, high = p["wilson_95"]
        austen = "n/a (prompt)" if p["austen_perplexity"] is None else f"{p['austen_perplexity']:.2f}"
        lines.append(f"| {name} | {p['share_positive']:.2f} ({low:.2f}-{high:.2f}) | {p['fluency_perplexity']:.2f} "
                     f"({p['fluency_perplexity'] / base:.2f}x) | {p['distinct_2']:.3f} | {austen} |")
    return "\n".join(lines)


def loop_table():
    """bench/closed_loop.py: set-point tracking against the open loop and the oracle, decay, a too-high gain."""
    r = load("closed_loop")
    if r is None:
        return ""
    s = r["summary"]
    lines = ["| session (last 10 turns, 160 generations each) | target | share judged positive (95% CI) | mean control | mean head reading |",
             "|---|---|---|---|---|",
             f"| open loop, neutral control | | {s['open_loop_neutral_share']:.2f} | 0 | |"]
    for name, v in s["targets"].items():
        lo, hi = v["closed_wilson_95"]
        olo, ohi = v["oracle_wilson_95"]
        lines.append(f"| closed loop ({name}) | {v['target']:.2f} | {v['closed_mean_share']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{v['closed_mean_control']:+.2f} | {v['closed_mean_reading']:.2f} |")
        lines.append(f"| oracle: fixed control from the steering curve ({name}) | {v['target']:.2f} | {v['oracle_mean_share']:.2f} "
                     f"({olo:.2f}-{ohi:.2f}) | {v['oracle_control']:+.2f} | |")
    h, d, u = r["head"], s["decay"], s["unstable_gain"]
    held = "; ".join(f"{row['method'].split('(')[1].rstrip(')')}: {row['value']:.2f}" for row in h["held_out_reviews"])
    lines += ["", f"Head: agrees with the judge on {h['agreement_with_judge']:.2f} of {h['generations']} generations "
              f"(95% CI {h['agreement_wilson_95'][0]:.2f}-{h['agreement_wilson_95'][1]:.2f}), AUC {h['auc_against_judge']:.2f}; "
              f"accuracy on 128 held-out reviews ({held}). Decay (half-life {r['decay']['half_life']:g} turns, no feedback): "
              f"measured half-life {d['measured_half_life']:.3f} turns (error {100 * d['relative_error']:.2f}%), share "
              f"{d['share_first_last'][0]:.2f} -> {d['share_first_last'][1]:.2f}. Gain {r['unstable_gain']['gain']:g}: "
              f"max |control| {u['max_abs_control']:.2f} (max_norm {u['max_norm']:g}), all finite: {u['all_finite']}."]
    return "\n".join(lines)


def _replace(text, start, end, body):
    if start not in text or end not in text:
        raise SystemExit(f"README.md needs {start} and {end} around a generated table.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def serving_table():
    """bench/serving.py: requests/s (p50 / p99 ms) per model, batching and controls, at 1, 4 and 16 clients."""
    r = load("serving")
    lines = ["| model | server | controls | 1 client | 4 clients | 16 clients |", "|---|---|---|---|---|---|"]
    for model, label in (("minilm", "MiniLM `:classify`"), ("smollm2", "SmolLM2 `:generate`")):
        for batched in ("unbatched", "batched"):
            for controls in ("1 control", "16 controls"):
                cells = []
                for clients in (1, 4, 16):
                    run = r["runs"][f"{model} {batched} {clients} clients {controls}"]
                    cells.append(f"{run['requests_per_s']:.1f} ({run['p50_ms']:.0f} / {run['p99_ms']:.0f})")
                lines.append(f"| {label} | {batched} | {controls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), START, END, table())
    if load("steering_compare") is not None:
        text = _replace(text, STEER_START, STEER_END, steering_table())
    if load("closed_loop") is not None:
        text = _replace(text, LOOP_START, LOOP_END, loop_table())
    if load("serving") is not None:
        text = _replace(text, SERVING_START, SERVING_END, serving_table())
    readme.write_text(text)
    print(table())
    print(steering_table())


if __name__ == "__main__":
    main()
