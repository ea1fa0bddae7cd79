# Inputs of the hybridge cloud-side module. Every variable has a type and a description
# (tests/tests/terraform.rs checks it).

variable "name" {
  type        = string
  description = "Prefix for every resource name and tag, e.g. \"hybridge-prod\"."
  default     = "hybridge"
}

variable "vpc_id" {
  type        = string
  description = "VPC the cloud nodes and the load balancer live in."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Subnets (one per availability zone) for the nodes and the network load balancer. Nodes are spread over them round-robin."

  validation {
    condition     = length(var.subnet_ids) >= 1
    error_message = "subnet_ids must name at least one subnet."
  }
}

variable "public_load_balancer" {
  type        = bool
  description = "Whether the network load balancer is internet-facing (on-prem reaches it over the internet) or internal (over Direct Connect/VPN)."
  default     = true
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type of each node. hybridge needs little memory (under 100 MiB under load); choose for network bandwidth."
  default     = "c7g.large"
}

variable "ami_id" {
  type        = string
  description = "Stock Debian 12 (bookworm) or later AMI for the .deb-at-boot path (used when image_id is empty), matching the architecture of instance_type and of the .deb at deb_url."
  default     = ""
}

variable "image_id" {
  type        = string
  description = "AMI imported from the hybridge VM image (terraform/image/build, x86_64, UEFI). With it, instances boot the image, which has the package baked in, and install nothing at boot (ami_id and deb_url are then unused; choose an x86_64 instance_type). Empty: ami_id plus the .deb from deb_url, installed at boot."
  default     = ""
}

variable "trust_domain" {
  type        = string
  description = "Trust domain of the hybridge CA (hybridge-ca init --trust-domain)."
}

variable "site" {
  type        = string
  description = "Site name of the cloud nodes; their certificates carry spiffe://TRUST_DOMAIN/site/SITE/node/NAME."
  default     = "aws"
}

variable "nodes" {
  type = list(object({
    name            = string
    cert_secret_arn = string
  }))
  description = "One entry per cloud node: its name (must match its certificate) and the ARN of the Secrets Manager secret holding {\"cert\": PEM chain, \"key\": PEM key} from `hybridge-ca issue node --site SITE --name NAME`."

  validation {
    condition     = length(var.nodes) >= 1 && length(distinct([for n in var.nodes : n.name])) == length(var.nodes)
    error_message = "nodes must list at least one node, with distinct names."
  }
}

variable "ca_secret_arn" {
  type        = string
  description = "ARN of the Secrets Manager secret holding the CA bundle (ca.pem) as a plain string."
}

variable "crl_secret_arn" {
  type        = string
  description = "Optional ARN of a secret holding the CRL (hybridge-ca crl); empty for none."
  default     = ""
}

variable "onprem_sites" {
  type        = list(string)
  description = "Sites whose node certificates may open tunnels to the cloud nodes (tunnel.allowed_sites)."
}

variable "onprem_cidrs" {
  type        = list(string)
  description = "Source CIDRs of the on-prem nodes (their NAT egress addresses). Only these may reach the tunnel port."

  validation {
    condition     = alltrue([for c in var.onprem_cidrs : can(cidrhost(c, 0))])
    error_message = "onprem_cidrs must be CIDR blocks such as 203.0.113.0/24."
  }
}

variable "tunnel_port" {
  type        = number
  description = "Port of the tunnel on the nodes and on the load balancer: UDP for QUIC, TCP for TLS/TCP."
  default     = 7443
}

variable "deb_url" {
  type        = string
  description = "Where the instances fetch the hybridge .deb when image_id is empty: an https:// URL or an s3:// object the instance role may read."
  default     = ""
}

variable "deb_bucket_arn" {
  type        = string
  description = "ARN of the S3 bucket holding the .deb when deb_url is s3://; empty when it is https://."
  default     = ""
}

variable "exports" {
  type = list(object({
    name      = string
    endpoints = list(string)
    protocol  = optional(string, "http1")
  }))
  description = "Services in the VPC that on-prem callers may reach: name, host:port endpoints, protocol (\"http1\" or \"h2c\" for gRPC)."
  default     = []
}

variable "imports" {
  type = list(object({
    service = string
    port    = number
    caller  = string
  }))
  description = "On-prem services that workloads on the nodes reach on 127.0.0.1:port with the fixed caller identity `caller`."
  default     = []
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}

variable "acl_policy" {
  type        = string
  description = "Contents of an ACL file (hybridge acl apply format) applied to every cloud node before it starts; empty keeps the default deny-all until rules are applied on the node through its admin socket (hybridge acl apply)."
  default     = ""
}
