# Two cloud nodes in two availability zones behind a UDP load balancer, for an on-prem
# site "dc1" with two nodes (dc1-a, dc1-b) whose configs are in this folder.
#
#   terraform init && terraform apply
#   terraform output tunnel_endpoint     # put it in onprem-dc1-a.toml / onprem-dc1-b.toml
#   terraform output member_networks     # and this in their [[peer]] member_networks

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  type        = string
  description = "AWS region of the cloud side."
  default     = "eu-west-1"
}

variable "vpc_id" {
  type        = string
  description = "Existing VPC holding the services to export."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Two public subnets in different availability zones."
}

variable "ami_id" {
  type        = string
  description = "Debian 12 arm64 AMI (for the default c7g.large instances)."
}

variable "onprem_egress_cidr" {
  type        = string
  description = "The data centre's NAT egress range, e.g. 203.0.113.0/28."
}

variable "deb_url" {
  type        = string
  description = "URL of the hybridge .deb (cargo deb -p hybridge), arm64 for c7g instances."
}

# Created once by the operator from hybridge-ca output, e.g.
#   aws secretsmanager create-secret --name hybridge/ca --secret-string file://ca/ca.pem
#   aws secretsmanager create-secret --name hybridge/node/cloud-1 \
#     --secret-string "$(jq -n --rawfile cert cloud-1.pem --rawfile key cloud-1.key '{cert:$cert,key:$key}')"
data "aws_secretsmanager_secret" "ca" {
  name = "hybridge/ca"
}

data "aws_secretsmanager_secret" "node" {
  for_each = toset(["cloud-1", "cloud-2"])
  name     = "hybridge/node/${each.value}"
}

module "hybridge" {
  source = "../.."

  name          = "hybridge-example"
  vpc_id        = var.vpc_id
  subnet_ids    = var.subnet_ids
  ami_id        = var.ami_id
  trust_domain  = "corp.example"
  site          = "aws"
  onprem_sites  = ["dc1"]
  onprem_cidrs  = [var.onprem_egress_cidr]
  deb_url       = var.deb_url
  ca_secret_arn = data.aws_secretsmanager_secret.ca.arn
  nodes = [
    { name = "cloud-1", cert_secret_arn = data.aws_secretsmanager_secret.node["cloud-1"].arn },
    { name = "cloud-2", cert_secret_arn = data.aws_secretsmanager_secret.node["cloud-2"].arn },
  ]

  exports = [
    { name = "recommendations", endpoints = ["10.20.1.10:50051", "10.20.2.10:50051"], protocol = "h2c" },
    { name = "catalog", endpoints = ["10.20.1.20:8080"] },
  ]
  imports = [
    { service = "billing", port = 8081, caller = "checkout" },
  ]
  acl_policy = file("${path.module}/acl.toml")
}

output "tunnel_endpoint" {
  description = "Address for the [[peer]] of the on-prem nodes."
  value       = module.hybridge.tunnel_endpoint
}

output "member_networks" {
  description = "Subnets of the cloud nodes, for member_networks of the on-prem nodes' [[peer]]."
  value       = module.hybridge.member_networks
}

output "node_ids" {
  description = "SPIFFE ids of the cloud nodes."
  value       = module.hybridge.node_ids
}
