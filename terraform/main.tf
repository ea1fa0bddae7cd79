# hybridge cloud side: fixed instances spread across availability zones, behind a network
# load balancer (UDP for QUIC, TCP for TLS/TCP tunnels, one port) that only the on-prem
# source ranges may reach.

locals {
  tags = merge({ "app" = "hybridge", "hybridge:site" = var.site }, var.tags)

  nodes = { for i, n in var.nodes : n.name => merge(n, { subnet_id = var.subnet_ids[i % length(var.subnet_ids)] }) }

  secret_arns = compact(concat([var.ca_secret_arn, var.crl_secret_arn], [for n in var.nodes : n.cert_secret_arn]))
}

data "aws_region" "current" {}

# ---------------------------------------------------------------- network

resource "aws_security_group" "node" {
  name_prefix = "${var.name}-node-"
  description = "hybridge nodes: QUIC and TLS/TCP tunnel from on-prem only; admin API stays on loopback"
  vpc_id      = var.vpc_id
  tags        = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

# The tunnel: UDP from the on-prem NAT ranges. A UDP NLB keeps client source addresses, so
# the same CIDRs apply on the instances. No rule admits the admin port (7180, loopback).
resource "aws_vpc_security_group_ingress_rule" "tunnel" {
  for_each          = toset(var.onprem_cidrs)
  security_group_id = aws_security_group.node.id
  description       = "hybridge QUIC tunnel from on-prem ${each.value}"
  ip_protocol       = "udp"
  from_port         = var.tunnel_port
  to_port           = var.tunnel_port
  cidr_ipv4         = each.value
  tags              = local.tags
}

# The same port over TCP: on-prem networks that block UDP fall back to TLS over TCP.
resource "aws_vpc_security_group_ingress_rule" "tunnel_tcp" {
  for_each          = toset(var.onprem_cidrs)
  security_group_id = aws_security_group.node.id
  description       = "hybridge TLS/TCP tunnel from on-prem ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.tunnel_port
  to_port           = var.tunnel_port
  cidr_ipv4         = each.value
  tags              = local.tags
}

# Exported services live in the VPC; the nodes call them and fetch the package and secrets.
resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.node.id
  description       = "upstream services, package, Secrets Manager"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_lb" "tunnel" {
  name                             = substr("${var.name}-tunnel", 0, 32)
  load_balancer_type               = "network"
  internal                         = !var.public_load_balancer
  subnets                          = var.subnet_ids
  enable_cross_zone_load_balancing = true
  tags                             = local.tags
}

# One TCP_UDP listener and target group: an NLB cannot have separate UDP and TCP listeners
# on one port. name_prefix and create_before_destroy let a change of protocol replace the
# group without a name clash.
resource "aws_lb_target_group" "tunnel" {
  name_prefix          = "hbtun-"
  port                 = var.tunnel_port
  protocol             = "TCP_UDP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = 45
  # QUIC connection migration is not used; stickiness by 5-tuple (the default) keeps each
  # connection on one node.
  # /readyz is 200 as soon as a node can accept tunnels (listeners bound, certificate valid),
  # before any on-prem node has dialled it, so a new node enters the group and gets tunnels;
  # 503 while it drains, so a stopping node leaves before it exits.
  health_check {
    protocol            = "HTTP"
    port                = "7181"
    path                = "/readyz"
    healthy_threshold   = 2
    unhealthy_threshold = 2
    interval            = 10
  }
  tags = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "tunnel" {
  load_balancer_arn = aws_lb.tunnel.arn
  port              = var.tunnel_port
  protocol          = "TCP_UDP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.tunnel.arn
  }
  tags = local.tags
}

# Health checks come from the load balancer's own addresses inside the VPC subnets.
data "aws_subnet" "node" {
  for_each = toset(var.subnet_ids)
  id       = each.value
}

resource "aws_vpc_security_group_ingress_rule" "health" {
  for_each          = data.aws_subnet.node
  security_group_id = aws_security_group.node.id
  description       = "NLB health checks of /readyz (read-only health port) from ${each.value.cidr_block}"
  ip_protocol       = "tcp"
  from_port         = 7181
  to_port           = 7181
  cidr_ipv4         = each.value.cidr_block
  tags              = local.tags
}

resource "aws_lb_target_group_attachment" "node" {
  for_each         = aws_instance.node
  target_group_arn = aws_lb_target_group.tunnel.arn
  target_id        = each.value.id
  port             = var.tunnel_port
}

# ---------------------------------------------------------------- identity

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name_prefix        = "${var.name}-node-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

# Each instance can read the CA, the CRL and the node secrets of this module, nothing else.
data "aws_iam_policy_document" "secrets" {
  statement {
    sid       = "ReadHybridgeSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = local.secret_arns
  }

  dynamic "statement" {
    for_each = var.deb_bucket_arn == "" || var.image_id != "" ? [] : [var.deb_bucket_arn]
    content {
      sid       = "ReadPackage"
      actions   = ["s3:GetObject"]
      resources = ["${statement.value}/*"]
    }
  }
}

resource "aws_iam_role_policy" "secrets" {
  name_prefix = "${var.name}-secrets-"
  role        = aws_iam_role.node.id
  policy      = data.aws_iam_policy_document.secrets.json
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${var.name}-node-"
  role        = aws_iam_role.node.name
  tags        = local.tags
}

# ---------------------------------------------------------------- instances

resource "aws_launch_template" "node" {
  name_prefix = "${var.name}-node-"
  # The hybridge VM image when given (package baked in), else stock Debian plus the .deb.
  image_id      = var.image_id != "" ? var.image_id : var.ami_id
  instance_type = var.instance_type

  lifecycle {
    precondition {
      condition     = var.image_id != "" || (var.ami_id != "" && var.deb_url != "")
      error_message = "Set image_id (the hybridge VM image), or ami_id and deb_url (Debian plus the .deb installed at boot)."
    }
  }

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # The security group sits on each node's network interface (aws_network_interface.node).

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tag_specifications {
    resource_type = "instance"
    tags          = local.tags
  }
  tags = local.tags
}

# Each node's network interface exists before its instance, so every node's configuration
# can list all nodes' own addresses (tunnel.announce): on-prem nodes dial each of them
# directly once the load balancer has let them in, and every cloud node gets a link to every
# on-prem node whichever node the balancer's flow hash picks.
resource "aws_network_interface" "node" {
  for_each        = local.nodes
  subnet_id       = each.value.subnet_id
  security_groups = [aws_security_group.node.id]
  tags            = merge(local.tags, { "Name" = "${var.name}-${each.key}", "hybridge:node" = each.key })
}

resource "aws_instance" "node" {
  for_each = local.nodes

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  network_interface {
    network_interface_id = aws_network_interface.node[each.key].id
    device_index         = 0
  }

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    node_name       = each.key
    site            = var.site
    region          = data.aws_region.current.name
    # Empty with the VM image: the set-up script then installs nothing.
    deb_url         = var.image_id == "" ? var.deb_url : ""
    ca_secret_arn   = var.ca_secret_arn
    crl_secret_arn  = var.crl_secret_arn
    cert_secret_arn = each.value.cert_secret_arn
    acl_b64         = var.acl_policy == "" ? "" : base64encode(var.acl_policy)
    hybridge_toml_b64 = base64encode(templatefile("${path.module}/templates/hybridge.toml.tftpl", {
      node_name    = each.key
      site         = var.site
      trust_domain = var.trust_domain
      config_dir   = "/etc/hybridge"
      data_dir     = "/var/lib/hybridge"
      tunnel_port  = var.tunnel_port
      onprem_sites = var.onprem_sites
      announce     = [for n in aws_network_interface.node : "${n.private_ip}:${var.tunnel_port}"]
      with_crl     = var.crl_secret_arn != ""
      exports      = var.exports
      imports      = var.imports
    }))
  })
  user_data_replace_on_change = true

  tags = merge(local.tags, { "Name" = "${var.name}-${each.key}", "hybridge:node" = each.key })
}
