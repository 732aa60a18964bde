#!/usr/bin/env bash
# Re-measures the README's agreement tables ("Agreement across modalities, tasks and encoders") from a checkpoint:
#   1. `measure` of the checkpoint on the synthetic ASR dev set (dev) and the EN->FR AST dev set (ast_dev), speech and
#      text, at last_prompt (the maps) with last beside it;
#   2. the same model with an untrained projector (no --ckpt_path: the checkpoint's own model settings, prompt
#      included, and a projector drawn with --seed 0); its text maps must equal the checkpoint's (the projector does
#      not touch text input), which is checked;
#   3. `compare` for each pair of the tables (surrogate null, paired bootstrap CIs where both maps measured the same
#      utterances), and tables.md: the README rows, made from the compare.json files.
# With OTHER_CKPT (a second checkpoint: Whisper base in place of tiny.en, or a projector trained on ASR + AST) it is
# measured the same way and compared with the first (cross-encoder rows) and with the untrained-projector control.
#
# Usage: scripts/agreement_tables.sh [CKPT] [OUT] [OTHER_CKPT [OTHER_LABEL]]
#   CKPT   default checkpoints/trained_default/version_0/checkpoints/epoch=2-step=640.ckpt
#   OUT    default checkpoints/agreement_tables (maps under OUT/trained, OUT/untrained, OUT/other; pairs under OUT/cmp)
#   PYTHON (the interpreter), N_PERM (1000), N_BOOT (500), SEED (0), PRECISION (32-true), ACCELERATOR (cpu)
# On a shared machine run it as: nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 scripts/agreement_tables.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CKPT=${1:-checkpoints/trained_default/version_0/checkpoints/epoch=2-step=640.ckpt}
OUT=${2:-checkpoints/agreement_tables}
OTHER=${3:-}
OTHER_LABEL=${4:-other}
PYTHON=${PYTHON:-python}
N_PERM=${N_PERM:-1000}
N_BOOT=${N_BOOT:-500}
SEED=${SEED:-0}
PRECISION=${PRECISION:-32-true}
ACCELERATOR=${ACCELERATOR:-cpu}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SETS='{dev: data_cache/synth/dev.jsonl, ast_dev: data_cache/synth/ast_dev.jsonl}'
mkdir -p "$OUT/cmp"
: > "$OUT/timings.txt"
PAIRS=()

measure() {  # measure NAME [flags...]: maps under OUT/NAME, log OUT/NAME.log
  local name=$1
  shift
  local start=$SECONDS
  "$PYTHON" -m lightning_speechllm measure "$@" --token_selection last_prompt --agreement_selections '[last_prompt, last]' \
    --data.val_sets "$SETS" --output_dir "$OUT/$name" --root_dir "$OUT/logs" --n_boot "$N_BOOT" --n_perm "$N_PERM" \
    --accelerator "$ACCELERATOR" --precision "$PRECISION" --seed "$SEED" > "$OUT/$name.log" 2>&1 \
    || { tail -30 "$OUT/$name.log" >&2; exit 1; }
  echo "measure $name: $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}

measure trained --ckpt_path "$CKPT"
# The untrained-projector control: the checkpoint's own model settings (same prompt, projector shape, dtypes).
"$PYTHON" - "$CKPT" "$OUT/untrained_model.yaml" <<'EOF'
import sys, torch, yaml
hparams = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["hyper_parameters"]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump({"model": hparams["model"]}, f)  # --config: `--model FILE` adds a __path__ key measure rejects
EOF
measure untrained --config "$OUT/untrained_model.yaml"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
for path in ("dev/text/epoch=0.json", "ast_dev/text/epoch=0.json", "dev/text/last/epoch=0.json"):
    a, b = (json.load(open(f"{out}/{run}/{path}")) for run in ("trained", "untrained"))
    if a["table"] != b["table"] or a["per_sample_sha256"] != b["per_sample_sha256"]:
        sys.exit(f"{path}: the untrained-projector run's text map differs from the checkpoint's: not the same model")
print("text maps of the checkpoint and of the untrained-projector run are identical")
EOF
if [ -n "$OTHER" ]; then
  measure other --ckpt_path "$OTHER"
fi

T=$OUT/trained U=$OUT/untrained O=$OUT/other M=epoch=0.json
compare() {  # compare NAME MAP_A LABEL_A MAP_B LABEL_B: the null draws surrogates of B
  local start=$SECONDS
  PAIRS+=("$1")
  "$PYTHON" -m lightning_speechllm compare "$2" "$4" --labels "$3" "$5" --n_perm "$N_PERM" --n_boot "$N_BOOT" \
    --seed "$SEED" --out "$OUT/cmp/$1" > /dev/null
  echo "compare $1: $((SECONDS - start)) s" >> "$OUT/timings.txt"
}
compare asr_speech-ast_speech  "$T/dev/speech/$M" "ASR, speech" "$T/ast_dev/speech/$M" "AST, speech"
compare asr_speech-asr_text    "$T/dev/speech/$M" "ASR, speech" "$T/dev/text/$M" "ASR, text"
compare ast_speech-ast_text    "$T/ast_dev/speech/$M" "AST, speech" "$T/ast_dev/text/$M" "AST, text"
compare asr_text-ast_text      "$T/dev/text/$M" "ASR, text" "$T/ast_dev/text/$M" "AST, text"
compare ctl_asr_trained-untrained "$T/dev/speech/$M" "ASR speech, trained projector" \
  "$U/dev/speech/$M" "ASR speech, untrained projector"
compare ctl_ast_trained-untrained "$T/ast_dev/speech/$M" "AST speech, trained projector" \
  "$U/ast_dev/speech/$M" "AST speech, untrained projector"
compare ctl_asr_untrained-asr_text "$U/dev/speech/$M" "ASR speech, untrained projector" "$T/dev/text/$M" "ASR, text"
compare ctl_asr-ast_untrained  "$U/dev/speech/$M" "ASR speech, untrained projector" \
  "$U/ast_dev/speech/$M" "AST speech, untrained projector"
compare last_asr_speech-asr_text "$T/dev/speech/last/$M" "ASR, speech (last)" "$T/dev/text/last/$M" "ASR, text (last)"
compare last_ast_speech-ast_text "$T/ast_dev/speech/last/$M" "AST, speech (last)" \
  "$T/ast_dev/text/last/$M" "AST, text (last)"
compare last_ctl_asr_untrained-asr_text "$U/dev/speech/last/$M" "ASR speech, untrained projector (last)" \
  "$T/dev/text/last/$M" "ASR, text (last)"
if [ -n "$OTHER" ]; then
  compare other_asr_speech-ast_speech "$O/dev/speech/$M" "$OTHER_LABEL ASR, speech" "$O/ast_dev/speech/$M" "$OTHER_LABEL AST, speech"
  compare other_asr_speech-asr_text "$O/dev/speech/$M" "$OTHER_LABEL ASR, speech" "$O/dev/text/$M" "$OTHER_LABEL ASR, text"
  compare first-other_asr_speech "$T/dev/speech/$M" "ASR, speech" "$O/dev/speech/$M" "$OTHER_LABEL ASR, speech"
  compare ctl_other-untrained "$O/dev/speech/$M" "$OTHER_LABEL ASR, speech" \
    "$U/dev/speech/$M" "ASR speech, untrained projector"
fi

# tables.md: one row per pair, in the order above.
"$PYTHON" - "$OUT" "${PAIRS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| a | b | CI | Spearman ρ | ρ null q95 | p(ρ) | path overlap (null q95, p) | same best block (null q95, p) "
        "| mean Jaccard (null q95, p) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
def ci(pair, key, fmt):
    low, high = pair["ci"][key]
    return f" [{low:{fmt}}, {high:{fmt}}]"
for path in (out / "cmp" / name / "compare.json" for name in sys.argv[2:]):
    pair = json.loads(path.read_text())["pairs"][0]
    null = pair["null"]
    def stat(key, fmt=".2f", with_ci=True):
        text = f"{pair[key]:{fmt}}" + (ci(pair, key, fmt) if with_ci and pair.get("ci") else "")
        return f"{text} ({null[key]['null_q95']:{fmt}}, {null[key]['p_value']:.4f})"
    rho = f"{pair['spearman_rho']:.3f}" + (ci(pair, "spearman_rho", ".3f") if pair.get("ci") else "")
    rows.append(f"| {pair['a']} | {pair['b']} | {(pair.get('ci') or {}).get('resampling', '–')} | {rho} "
                f"| {null['spearman_rho']['null_q95']:.3f} | {null['spearman_rho']['p_value']:.4f} "
                f"| {stat('path_overlap')} | {stat('same_best_block')} | {stat('path_mean_jaccard', with_ci=False)} |")
(out / "tables.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
cat "$OUT/timings.txt"
