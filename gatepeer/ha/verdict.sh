# keepalived's health check for gatepeer: the verdict line the daemon wrote (gatepeer/ha/verdict.py).
# Usage: sh verdict.sh FILE MAX_AGE. Exit 0 only for a line "<unix time> <pid> ok ..." written at
# most MAX_AGE seconds ago by a process that still runs.
read -r at pid verdict rest < "$1"  # no final newline: read fails but sets the words
case "$at$pid" in '' | *[!0-9]*) exit 1 ;; esac
[ "$verdict" = ok ] || exit 1
[ -d "/proc/$pid" ] || exit 1
[ $(($(date +%s) - at)) -le "$2" ]
