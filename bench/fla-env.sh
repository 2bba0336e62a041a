# Sourced on the lent GPU by the scripts that run fla 0.6.0: installs the carried wheels
# (.whl: fla-core and flash-linear-attention; .whl/tf: transformers and its dependencies,
# numpy only where the device has none) into /tmp/site and puts it on PYTHONPATH.
site=/tmp/site
wheels=(.whl/*.whl)
for w in .whl/tf/*.whl; do
    if [[ $w == *numpy-* ]] && python3 -c "import numpy" 2>/dev/null; then continue; fi
    wheels+=("$w")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
export PYTHONPATH=$site
