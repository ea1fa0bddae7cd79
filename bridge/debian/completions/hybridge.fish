# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hybridge_global_optspecs
    string join \n log= log-format= h/help V/version
end

function __fish_hybridge_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hybridge_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hybridge_using_subcommand
    set -l cmd (__fish_hybridge_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hybridge -n "__fish_hybridge_needs_command" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_needs_command" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_needs_command" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_needs_command" -s V -l version -d 'Print version'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "run" -d 'Run a node from its config file (under systemd: Type=notify)'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "reload" -d 'Ask the running node to reload its config, certificates, CA bundle and CRL'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "dev" -d 'Start a complete demo on loopback: CA, on-prem and cloud node, demo upstreams, sample ACLs'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "check-config" -d 'Check a config file and the files it references with the checks `run` makes'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "status" -d 'Show a running node\'s tunnels, services and policy version'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "acl" -d 'Manage service ACLs'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "completions" -d 'Print a shell completion script for hybridge to stdout'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "man" -d 'Write man pages for hybridge and each of its subcommands into DIR'
complete -c hybridge -n "__fish_hybridge_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge -n "__fish_hybridge_using_subcommand run" -s c -l config -d 'The node\'s config file' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand run" -l worker-threads -d 'Worker threads (default: one per CPU), like Envoy\'s `--concurrency`. Each worker has its own listeners, tunnel connections and upstream connections, so a request stays on one thread; the admin API and health checks run on the main thread. One thread (asked for, or on a one-CPU host) runs everything on the main thread, like one nginx or HAProxy worker' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand run" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand run" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand run" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -s c -l config -d 'The node\'s config file: its `admin.socket` is where the node is asked (unless --admin or HYBRIDGE_ADMIN say otherwise). The node re-reads the file it runs from' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand reload" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand dev" -l base-port -d 'First port of the block the demo listens on (0 = pick free ports)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand dev" -l worker-threads -d 'Worker threads (default: one per CPU), like Envoy\'s `--concurrency`. Each worker has its own listeners, tunnel connections and upstream connections, so a request stays on one thread; the admin API and health checks run on the main thread. One thread (asked for, or on a one-CPU host) runs everything on the main thread, like one nginx or HAProxy worker' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand dev" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand dev" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand dev" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand check-config" -s c -l config -d 'The config file to check' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand check-config" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand check-config" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand check-config" -l json -d 'Print the result as JSON (warnings included) on stdout'
complete -c hybridge -n "__fish_hybridge_using_subcommand check-config" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -s c -l config -d 'The node\'s config file: its `admin.socket` is where the node is asked (unless --admin or HYBRIDGE_ADMIN say otherwise)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -l json -d 'Print the raw JSON document'
complete -c hybridge -n "__fish_hybridge_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "list" -d 'List the rules, export declarations and the policy version'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "ls" -d 'List the rules, export declarations and the policy version'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "add" -d 'Add one rule'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "remove" -d 'Remove a rule by id'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "rm" -d 'Remove a rule by id'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "apply" -d 'Make the rules and export declarations equal a policy file, on one node or several'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "check" -d 'Explain the decision for a request. Exit code: 0 allowed, 1 denied, 2 error'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "log" -d 'Show the audit log, newest first'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and not __fish_seen_subcommand_from list ls add remove rm apply check log help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -l json -d 'Print JSON instead of a table'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -l json -d 'Print JSON instead of a table'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from ls" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l source -d 'Calling service, or "*" (the policy file\'s `source`)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l source-site -d 'Only callers entering through a node of this site (repeatable; default any site; the policy file\'s `source_site`)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l destination -d 'Called service, or "*" (the policy file\'s `destination`)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l method -d 'Restrict to this HTTP method (repeatable)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l path-prefix -d 'Restrict to paths starting with this prefix (on segment boundaries)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l description -d 'Free text kept with the rule and shown by `acl list`' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l id -d 'Rule id (default: SOURCE-to-DESTINATION[-N])' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l allow -d 'The rule allows the calls it matches'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -l deny -d 'The rule denies the calls it matches'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from remove" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -s f -l file -d 'The policy file' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l dry-run -d 'Show the diff without changing anything'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -l json -d 'Print the diff as JSON (an array of one object per node when several are given)'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from apply" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l source -d 'Calling service (the policy file\'s `source`)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l source-site -d 'Site of the node the caller enters through (rules with `source_site` need it)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l destination -d 'Called service (the policy file\'s `destination`)' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -l json -d 'Print the explanation as JSON'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from check" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l limit -d 'How many entries to show' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l db -d 'Operate directly on this redb file (the daemon using it must be stopped) instead of through a node\'s admin API' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l admin -d 'The node\'s admin API: unix:/PATH (the admin socket), http://HOST:PORT (the read-only listener: status only) or https://HOST:PORT (the remote listener, with --cert, --key and --ca). Default: $HYBRIDGE_ADMIN, else unix:/run/hybridge/admin.sock. `acl apply` takes several (repeat --admin, or separate them with commas, here or in HYBRIDGE_ADMIN) and applies the file to each' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l cert -d 'Administrator certificate chain for https:// (`hybridge-ca issue admin`)' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l key -d 'Its private key' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l ca -d 'The hybridge CA bundle the node\'s certificate must chain to' -r -F
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -l json -d 'Print JSON (every id an apply entry kept) instead of lines'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from log" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the rules, export declarations and the policy version'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "add" -d 'Add one rule'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "remove" -d 'Remove a rule by id'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "apply" -d 'Make the rules and export declarations equal a policy file, on one node or several'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "check" -d 'Explain the decision for a request. Exit code: 0 allowed, 1 denied, 2 error'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "log" -d 'Show the audit log, newest first'
complete -c hybridge -n "__fish_hybridge_using_subcommand acl; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge -n "__fish_hybridge_using_subcommand completions" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand completions" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge -n "__fish_hybridge_using_subcommand man" -l log -d 'Log filter (tracing EnvFilter syntax), e.g. `info`, `hybridge=debug`; an invalid one is an error (exit 2), naming HYBRIDGE_LOG when it came from there' -r
complete -c hybridge -n "__fish_hybridge_using_subcommand man" -l log-format -d 'Log format: `auto` is human-readable on a terminal and JSON lines otherwise' -r -f -a "auto\t''
json\t''
text\t''"
complete -c hybridge -n "__fish_hybridge_using_subcommand man" -s h -l help -d 'Print help'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "run" -d 'Run a node from its config file (under systemd: Type=notify)'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "reload" -d 'Ask the running node to reload its config, certificates, CA bundle and CRL'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "dev" -d 'Start a complete demo on loopback: CA, on-prem and cloud node, demo upstreams, sample ACLs'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "check-config" -d 'Check a config file and the files it references with the checks `run` makes'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "status" -d 'Show a running node\'s tunnels, services and policy version'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "acl" -d 'Manage service ACLs'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "completions" -d 'Print a shell completion script for hybridge to stdout'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "man" -d 'Write man pages for hybridge and each of its subcommands into DIR'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and not __fish_seen_subcommand_from run reload dev check-config status acl completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "list" -d 'List the rules, export declarations and the policy version'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "add" -d 'Add one rule'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "remove" -d 'Remove a rule by id'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "apply" -d 'Make the rules and export declarations equal a policy file, on one node or several'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "check" -d 'Explain the decision for a request. Exit code: 0 allowed, 1 denied, 2 error'
complete -c hybridge -n "__fish_hybridge_using_subcommand help; and __fish_seen_subcommand_from acl" -f -a "log" -d 'Show the audit log, newest first'
