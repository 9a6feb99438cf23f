export PYTHONPATH=. PYTHONUNBUFFERED=1
P="timeout 200 python3 scripts/profile_gemm_kernels.py --shapes fc1 --codes fp8 int8 --forms 64x128xds --gelu-codes --codes-wg --time 20"
$P 2>&1 | grep "us per call\|rror"
echo "== GELU in the compute warpgroups"
patch -s -p0 < exp_gic.patch && timeout 100 python3 -m pytest tests/quant/kernels/test_gpu_kernels.py -q -x -k "codes_warpgroup" 2>&1 | grep "passed\|failed\|Error" | tail -3
$P 2>&1 | grep "+wg\|rror"; patch -s -R -p0 < exp_gic.patch
$P 2>&1 | grep "us per call\|rror"
timeout 300 python3 -m qdit_jax bench --batch 64 --variants bf16 real-fp8-g128 real-fp8-g128-wg real-w8a8-g128 real-w8a8-g128-nowg real-w4a8-g128 real-w4a8-g128-nowg --repeats 6 --matmul-peak 0 2>&1 | grep -A12 "^variant"
