#!/bin/sh
# Keeps a folder that a running reader polls (Triton's model repository, the orchestrator's index folder) in
# step with object storage, so that a new model version reaches a running pod without a restart and the
# reader never sees half of a version.
#
#   artifact-sync.sh promote STAGING LIVE
#   artifact-sync.sh sync SOURCE_URI STAGING LIVE [EVERY_S] [-- aws s3 sync options, e.g. --exclude/--include]
#
# sync: `aws s3 sync --delete` SOURCE_URI into STAGING, then promote. With EVERY_S: a round every EVERY_S
# seconds for ever, a failed round logged and tried again at the next; without: one round, whose status
# is the exit status. With EVERY_S and $ARTIFACT_SYNC_HEARTBEAT naming a file, the loop touches that file
# as each round starts: a liveness probe tells a stuck round by the file's age.
#
# promote: LIVE follows STAGING.
# - A version folder (a name of digits only, Triton's <model>/<N>/, or v + digits, a bundle's v<N>/) that
#   LIVE lacks is copied into a work folder beside LIVE (.<LIVE's name>.incoming, on LIVE's filesystem),
#   then renamed into place: a reader polling LIVE finds all of it or nothing, and the folder that holds it
#   changes once. (A polling Triton reloads a model whenever its folder changes, and a model folder must not
#   change while the model loads: a copy staged inside the model folder would do both.)
# - A version folder LIVE has is left alone while it holds every file of STAGING's, at the same size: a
#   version's files never change once published, and a reader may add its own (__pycache__). One that lacks
#   a file (a round that caught an upload half done) is copied whole again and swapped in.
# - A version folder LIVE has and STAGING lacks (a retired version) is renamed away, then deleted.
# - Any other file (config.pbtxt) is replaced by a rename over it when its content differs.
# - Any other folder (a model's) is created when missing and followed the same way; whatever STAGING lacks
#   goes, after what STAGING adds has arrived, so a model never lacks a version while one replaces another.
# Nothing changes in LIVE when STAGING has not changed: a polling Triton reloads nothing. The work folder
# goes at the end (and at the start, if an interrupted run left it). Hidden names (.*) in STAGING are not
# copied. An empty STAGING is refused: a wrong SOURCE_URI must not empty LIVE.
#
# Runs in the aws-cli image: POSIX sh and coreutils, nothing else.

log() {
    printf '%s artifact-sync: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

usage() {
    echo "usage: artifact-sync.sh promote STAGING LIVE" >&2
    echo "       artifact-sync.sh sync SOURCE_URI STAGING LIVE [EVERY_S] [-- aws s3 sync options]" >&2
    exit 2
}

is_version() {
    case ${1#v} in
        '' | *[!0-9]*) return 1 ;;
    esac
    return 0
}

has_entries() {
    for entry in "$1"/*; do
        [ -e "$entry" ] && return 0
    done
    return 1
}

# Whether every file below folder $1 is below folder $2 too, at the same size. Functions written as
# ( ... ) run in a subshell, so the recursion keeps each level's variables.
holds() (
    for entry in "$1"/*; do
        name=${entry##*/}
        if [ -d "$entry" ]; then
            [ -d "$2/$name" ] && holds "$entry" "$2/$name" || exit 1
        elif [ -e "$entry" ]; then
            [ -f "$2/$name" ] && [ "$(wc -c <"$entry")" = "$(wc -c <"$2/$name")" ] || exit 1
        fi
    done
)

# Moves $1 to $2 through a fresh folder in $work: the copy is made there, then one rename puts it in place.
place() (
    incoming=$(mktemp -d "$work/XXXXXX") || exit 1
    cp -R "$1" "$incoming/new" && mv -f "$incoming/new" "$2" && rm -rf "$incoming"
)

# Takes $1 out of LIVE with one rename, then deletes it: a reader never sees half of it deleted.
remove() (
    outgoing=$(mktemp -d "$work/XXXXXX") || exit 1
    mv "$1" "$outgoing/old" && rm -rf "$outgoing"
)

# LIVE folder $2 follows STAGING folder $1.
follow() (
    staging=$1
    live=$2
    [ -d "$live" ] || mkdir "$live" || exit 1
    for source in "$staging"/*; do
        [ -e "$source" ] || continue
        name=${source##*/}
        target=$live/$name
        if [ -d "$source" ] && is_version "$name"; then
            if [ ! -e "$target" ]; then
                place "$source" "$target" || exit 1
                log "added $target"
            elif ! holds "$source" "$target"; then
                # Built whole first; the old folder goes and the new one comes in two renames back to back.
                incoming=$(mktemp -d "$work/XXXXXX") && cp -R "$source" "$incoming/new" &&
                    remove "$target" && mv "$incoming/new" "$target" && rm -rf "$incoming" || exit 1
                log "replaced $target: it lacked files of $source"
            fi
        elif [ -d "$source" ]; then
            if [ -e "$target" ] && [ ! -d "$target" ]; then
                remove "$target" || exit 1
            fi
            follow "$source" "$target" || exit 1
        else
            if [ -d "$target" ]; then
                remove "$target" || exit 1
            fi
            if [ ! -e "$target" ] || [ "$(cksum <"$source")" != "$(cksum <"$target")" ]; then
                place "$source" "$target" || exit 1
                log "updated $target"
            fi
        fi
    done
    for target in "$live"/*; do
        [ -e "$target" ] || [ -L "$target" ] || continue
        if [ ! -e "$staging/${target##*/}" ]; then
            remove "$target" || exit 1
            log "removed $target"
        fi
    done
)

promote() {
    if [ ! -d "$1" ]; then
        log "STAGING $1 is not a folder"
        return 1
    fi
    if ! has_entries "$1"; then
        log "STAGING $1 is empty: LIVE $2 is left as it is (does the source hold anything?)"
        return 1
    fi
    mkdir -p "$2" || return 1
    work=$(dirname "$2")/.$(basename "$2").incoming
    rm -rf "$work" && mkdir "$work" || return 1
    # A rename across filesystems is a copy: a reader could see half of a version.
    if [ "$(stat -c %d "$work")" != "$(stat -L -c %d "$2")" ]; then
        log "LIVE $2 is not on the filesystem of its parent folder, where $work is: LIVE is left as it is"
        rm -rf "$work"
        return 1
    fi
    follow "$1" "$2"
    status=$?
    rm -rf "$work"
    return $status
}

# `aws s3 sync --delete` deletes files, not the folders they leave empty: an empty version folder would
# otherwise stay in STAGING, and so in LIVE.
prune() (
    for entry in "$1"/*; do
        if [ -d "$entry" ]; then
            prune "$entry"
            rmdir "$entry" 2>/dev/null
        fi
    done
    return 0
)

# One round of sync; "$@": the extra aws s3 sync options. aws and sleep run in the background with `wait`,
# so that a trapped SIGTERM ends the loop at once instead of after the running command.
round() {
    aws s3 sync --no-progress --delete "$@" "$uri" "$staging" &
    if ! wait $!; then
        log "aws s3 sync $uri failed: LIVE $live is left as it is"
        return 1
    fi
    prune "$staging"
    if ! promote "$staging" "$live"; then
        log "promote $staging -> $live failed"
        return 1
    fi
}

[ $# -ge 1 ] || usage
mode=$1
shift
case $mode in
    promote)
        [ $# -eq 2 ] || usage
        promote "$1" "$2"
        ;;
    sync)
        [ $# -ge 3 ] || usage
        uri=$1
        staging=$2
        live=$3
        shift 3
        every=
        if [ $# -gt 0 ] && [ "$1" != -- ]; then
            every=$1
            shift
            case $every in
                '' | *[!0-9]* | 0) usage ;;
            esac
        fi
        if [ $# -gt 0 ]; then
            [ "$1" = -- ] || usage
            shift
        fi
        mkdir -p "$staging" "$live" || exit 1
        if [ -z "$every" ]; then
            round "$@"
            exit
        fi
        # PID 1 of its container: without a trap, SIGTERM would be ignored until the grace period ends.
        trap 'exit 0' TERM INT
        while :; do
            [ -z "${ARTIFACT_SYNC_HEARTBEAT:-}" ] || touch "$ARTIFACT_SYNC_HEARTBEAT"
            round "$@"
            sleep "$every" &
            wait $!
        done
        ;;
    *)
        usage
        ;;
esac
