output "tunnel_endpoint" {
  description = "host:port the on-prem nodes dial ([[peer]] address in their hybridge.toml)."
  value       = "${aws_lb.tunnel.dns_name}:${var.tunnel_port}"
}

output "node_ids" {
  description = "SPIFFE id of each cloud node, by node name."
  value       = { for n in var.nodes : n.name => "spiffe://${var.trust_domain}/site/${var.site}/node/${n.name}" }
}

output "instance_ids" {
  description = "EC2 instance id of each cloud node, by node name."
  value       = { for name, i in aws_instance.node : name => i.id }
}

output "security_group_id" {
  description = "Security group of the nodes; add rules for the VPC services they call, if egress is restricted."
  value       = aws_security_group.node.id
}

output "role_arn" {
  description = "IAM role of the nodes (reads only the listed secrets)."
  value       = aws_iam_role.node.arn
}
