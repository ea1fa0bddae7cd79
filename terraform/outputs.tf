output "tunnel_endpoint" {
  description = "host:port the on-prem nodes dial ([[peer]] address in their hybridge.toml)."
  value       = "${aws_lb.tunnel.dns_name}:${var.tunnel_port}"
}

output "node_addresses" {
  description = "Each cloud node's own tunnel address (private IP:port), by node name; the nodes announce these to the on-prem nodes."
  value       = { for name, n in aws_network_interface.node : name => "${n.private_ip}:${var.tunnel_port}" }
}

output "member_networks" {
  description = "The nodes' subnets: member_networks for the on-prem nodes' [[peer]], so they keep a link to every cloud node (they must route to these addresses, e.g. over VPN or Direct Connect)."
  value       = [for s in data.aws_subnet.node : s.cidr_block]
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
