#!/bin/sh
# Build the sftest in-guest agent: a static binary with no dependencies beyond libc.
#   guest/agent/build.sh [OUTPUT]        (default: build/guest/agent/sf-agent)
# CC overrides the compiler. VARIANT=debug builds a dynamically linked binary with symbols
# (for valgrind, which cannot follow malloc in a static binary); VARIANT=asan adds
# AddressSanitizer and UBSan (which cannot be linked statically).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../build/guest/agent/sf-agent}
mkdir -p "$(dirname "$out")"
cc="${CC:-gcc} -std=c11 -Wall -Wextra -Wno-sign-compare -Wno-missing-field-initializers"
case ${VARIANT:-static} in
  static) exec $cc -Os -static -s -ffunction-sections -fdata-sections -Wl,--gc-sections \
            -o "$out" "$here/sf-agent.c" ;;
  debug) exec $cc -g -O1 -o "$out" "$here/sf-agent.c" ;;
  asan) exec $cc -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
          -fno-sanitize-recover=undefined -o "$out" "$here/sf-agent.c" ;;
  *) echo "unknown VARIANT ${VARIANT}" >&2; exit 2 ;;
esac
