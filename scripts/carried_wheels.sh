# Sourced by the GPU scripts.  install_carried_wheels LOG: install the wheels carried in .whl/ (ucxx, UCX and
# their dependencies) into /tmp/site, once per set of wheels on a machine (a later call with the same wheels
# only puts /tmp/site on the path), pip's output appended to LOG; then /tmp/site goes first on PYTHONPATH.
# Returns 0 (also when .whl/ holds no wheel: nothing to do), 1 when pip failed.  Python: $PY, else python3.
install_carried_wheels() {
  local log=$1 stamp=/tmp/site/.carried-wheels want
  ls .whl/*.whl >/dev/null 2>&1 || return 0
  want=$(md5sum .whl/*.whl | md5sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$log" 2>&1 || return 1
    echo "$want" > "$stamp"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
