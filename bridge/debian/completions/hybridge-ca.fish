# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hybridge_ca_global_optspecs
    string join \n h/help V/version
end

function __fish_hybridge_ca_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hybridge_ca_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hybridge_ca_using_subcommand
    set -l cmd (__fish_hybridge_ca_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -s V -l version -d 'Print version'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "init" -d 'Create a new self-signed CA in DIR (refuses to overwrite an existing one)'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "issue" -d 'Issue a node, service or administrator certificate'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "list" -d 'List every certificate this CA issued'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "revoke" -d 'Revoke a certificate by serial, or every still-valid certificate of a SPIFFE id'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "crl" -d 'Write a signed CRL listing every revoked certificate'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "inspect" -d 'Show subject, SANs, validity, issuer, serial and fingerprint of a certificate file'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "completions" -d 'Print a shell completion script for hybridge-ca to stdout'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "man" -d 'Write man pages for hybridge-ca and each of its subcommands into DIR'
complete -c hybridge-ca -n "__fish_hybridge_ca_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand init" -l dir -d 'CA directory (created 0700 if missing)' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand init" -l trust-domain -d 'Trust domain, e.g. corp.example ([a-z0-9._-]+)' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand init" -l validity -d 'CA certificate lifetime' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand init" -l key-type -d 'CA key algorithm' -r -f -a "ecdsa-p256\t'ECDSA P-256'
ed25519\t'Ed25519'"
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand init" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and not __fish_seen_subcommand_from node service admin help" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and not __fish_seen_subcommand_from node service admin help" -f -a "node" -d 'Certificate for a bridge node: spiffe://TD/site/SITE/node/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and not __fish_seen_subcommand_from node service admin help" -f -a "service" -d 'Certificate for a service: spiffe://TD/svc/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and not __fish_seen_subcommand_from node service admin help" -f -a "admin" -d 'Certificate for an administrator: spiffe://TD/admin/NAME (clientAuth only)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and not __fish_seen_subcommand_from node service admin help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l site -d 'Site of the node' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l name -d 'Node name' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l dns -d 'DNS SAN (repeatable)' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l ip -d 'IP SAN (repeatable)' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l validity -d 'Certificate lifetime' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l out -d 'Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600)' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -l json -d 'Print JSON instead of a line'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from node" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l name -d 'Service name' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l dns -d 'DNS SAN (repeatable)' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l validity -d 'Certificate lifetime' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l out -d 'Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600)' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -l json -d 'Print JSON instead of a line'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from service" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -l name -d 'Administrator name, recorded in every audit log entry of the changes made with it' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -l validity -d 'Certificate lifetime' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -l out -d 'Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600)' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -l json -d 'Print JSON instead of a line'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from admin" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from help" -f -a "node" -d 'Certificate for a bridge node: spiffe://TD/site/SITE/node/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from help" -f -a "service" -d 'Certificate for a service: spiffe://TD/svc/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from help" -f -a "admin" -d 'Certificate for an administrator: spiffe://TD/admin/NAME (clientAuth only)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand issue; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand list" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand list" -l json -d 'Print JSON instead of a table'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand list" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand revoke" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand revoke" -l spiffe -d 'Revoke every still-valid certificate of this SPIFFE id' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand revoke" -l reason -d 'Reason: unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation, privilege-withdrawn' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand revoke" -l json -d 'Print JSON instead of lines'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand revoke" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand crl" -l dir -d 'CA directory' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand crl" -l out -d 'Where to write the CRL (PEM)' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand crl" -l next-update -d 'How long the CRL claims to be current (nextUpdate)' -r
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand crl" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand inspect" -l dir -d 'CA directory: also report whether the certificate is revoked' -r -F
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand inspect" -l json -d 'Print JSON instead of lines'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand completions" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand man" -s h -l help -d 'Print help'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "init" -d 'Create a new self-signed CA in DIR (refuses to overwrite an existing one)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "issue" -d 'Issue a node, service or administrator certificate'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "list" -d 'List every certificate this CA issued'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "revoke" -d 'Revoke a certificate by serial, or every still-valid certificate of a SPIFFE id'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "crl" -d 'Write a signed CRL listing every revoked certificate'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "inspect" -d 'Show subject, SANs, validity, issuer, serial and fingerprint of a certificate file'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "completions" -d 'Print a shell completion script for hybridge-ca to stdout'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "man" -d 'Write man pages for hybridge-ca and each of its subcommands into DIR'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and not __fish_seen_subcommand_from init issue list revoke crl inspect completions man help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and __fish_seen_subcommand_from issue" -f -a "node" -d 'Certificate for a bridge node: spiffe://TD/site/SITE/node/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and __fish_seen_subcommand_from issue" -f -a "service" -d 'Certificate for a service: spiffe://TD/svc/NAME'
complete -c hybridge-ca -n "__fish_hybridge_ca_using_subcommand help; and __fish_seen_subcommand_from issue" -f -a "admin" -d 'Certificate for an administrator: spiffe://TD/admin/NAME (clientAuth only)'
