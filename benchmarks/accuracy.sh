#!/usr/bin/env bash
# The full accuracy runs behind docs/results.md (not part of the test suite).
# Fashion-MNIST needs `apt-get install dataset-fashion-mnist`; MNIST-1D needs `pip install '.[study]'`.
set -euo pipefail
out=${1:-runs/accuracy}
sgd="--optimizer sgd --lr 0.05 --momentum 0.9 --schedule cosine --epochs 10"
kinkprop train --model mlp --widths 512,256 $sgd --out "$out/fmnist-mlp" --force
kinkprop train --model convnet $sgd --out "$out/fmnist-convnet" --force
kinkprop train --model convnet --batch-norm $sgd --out "$out/fmnist-convnet-bn" --force
kinkprop train --dataset mnist1d --model mlp --widths 256,256 --batch-norm --batch-size 100 \
    --optimizer adam --lr 0.002 --schedule cosine --epochs 100 --out "$out/mnist1d-mlp-bn" --force
kinkprop train --dataset mnist1d --model mlp --widths 512,512 --batch-size 100 --optimizer adamw \
    --lr 0.001 --weight-decay 0.1 --schedule cosine --epochs 200 --out "$out/mnist1d-mlp" --force
kinkprop train --dataset mnist1d --model convnet --batch-size 100 --optimizer adam --lr 0.002 \
    --schedule cosine --epochs 40 --out "$out/mnist1d-convnet" --force
for run in "$out"/*/; do
  python -c "import json,sys; d=json.load(open(sys.argv[1]+'summary.json')); print(f\"{sys.argv[1]:40s} test acc {d['final_test_acc']:.4f}  {d['seconds']:.0f} s\")" "$run"
done
