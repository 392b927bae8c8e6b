#!/usr/bin/env bash
# Create .venv and install everything the project needs (inference, fine-tuning, serving, tests).
#   bash setup.sh            # full install (DeepSpeed included)
#   bash setup.sh --no-ds    # inference only, no DeepSpeed
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ "${1:-}" = "--no-ds" ]; then
  pip install -r requirements_wo_ds.txt
  pip install --no-deps SwissArmyTransformer==0.4.12
else
  pip install -r requirements.txt
fi
python -c "import model.sat, sat; print('VisualGLM environment ready: torch', __import__('torch').__version__)"
# The bundled tiny model in Hugging Face format as well (cli_demo_hf.py / api_hf.py / web_demo_hf.py
# --from_pretrained visualglm-tiny-hf); an existing folder is kept as it is.
[ -e pretrained/visualglm-tiny-hf ] || python -m model.convert sat-to-hf visualglm-tiny pretrained/visualglm-tiny-hf
