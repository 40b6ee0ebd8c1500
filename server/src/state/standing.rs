//! What a write was judged on, carried with it to the state machine.
//!
//! A server judges a request from the state it has applied, which on a
//! follower may lag the leader's: a token deleted, or its policies narrowed,
//! a moment ago on the leader still stands there, and so does a node
//! certificate's node that was just deregistered. Each write therefore
//! carries its caller's [`Standing`] as the judging server saw it, and the
//! state machine applies the write only if that standing still holds in the
//! state the write is applied to (which every server computes alike): the
//! token's rights unchanged (its policies, their rules, its identities;
//! fingerprinted, not indexed); the certificate's node
//! still registered by its agent, and registered no later than when the
//! write was judged. Otherwise the write is refused and the caller sends it
//! again, to be judged on the state as it now is.
use serde::{Deserialize, Serialize};
use weft_api::catalog::Node;

use crate::acl::{AclState, AclToken};

use super::State;

/// The credential a request was judged on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// An ACL token, its rights as `epoch` fingerprints them
    /// ([`AclState::rights_epoch`]).
    Token { accessor: String, epoch: u64 },
    /// A node certificate: its node as registered at `create_index`.
    NodeCertificate { node: String, create_index: u64 },
}

/// Why a write was not applied: its caller's standing changed after the
/// server that received it judged it.
pub const STANDING_CHANGED: &str = "the caller's token or node changed after this request was \
     judged (a server lagging behind the leader judged it): send it again";

impl Standing {
    /// The standing of `token` in `acl`.
    pub fn of_token(acl: &AclState, token: &AclToken) -> Self {
        Standing::Token {
            accessor: token.accessor_id.clone(),
            epoch: acl.rights_epoch(token),
        }
    }

    /// The standing of a certificate of `node`.
    pub fn of_node(node: &Node) -> Self {
        Standing::NodeCertificate {
            node: node.name.clone(),
            create_index: node.create_index,
        }
    }
}

impl State {
    /// Whether `standing` holds in this state: what was judged on it may be
    /// applied here.
    pub fn still_stands(&self, standing: &Standing) -> bool {
        match standing {
            Standing::Token { accessor, epoch } => (self.acl.tokens.get(accessor))
                .is_some_and(|token| self.acl.rights_epoch(token) == *epoch),
            Standing::NodeCertificate { node, create_index } => {
                self.nodes.get(node).is_some_and(|n| {
                    n.create_index == *create_index && !weft_api::catalog_register::is_external(n)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::tests::token;
    use crate::acl::AclPolicy;
    use crate::raft::sm_store::tests::put;
    use crate::state::{Command, CommandResult};

    fn policy(id: &str, rules: &str) -> AclPolicy {
        AclPolicy {
            id: id.into(),
            name: format!("policy-{id}"),
            description: String::new(),
            rules: rules.into(),
            create_index: 0,
            modify_index: 0,
            replicated: false,
        }
    }

    fn once(request: &str, cmd: Command, standing: &Standing) -> Command {
        Command::Once {
            client: "judged".into(),
            request: request.into(),
            cmd: Box::new(cmd),
            standing: Some(standing.clone()),
        }
    }

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            ..Default::default()
        }
    }

    /// A state with policy "p" (write on keys under "app/") and token "t"
    /// linking it, and the token's standing as a server judging now sees it.
    fn with_token() -> (State, Standing) {
        let mut s = State::default();
        s.apply(
            Command::AclPolicyUpsert(policy("p", r#"key_prefix "app/" { policy = "write" }"#)),
            1,
        );
        s.apply(Command::AclTokenUpsert(token("t", "secret-t", &["p"])), 2);
        let standing = Standing::of_token(&s.acl, s.acl.token_by_secret("secret-t").unwrap());
        (s, standing)
    }

    fn refused_as_changed(result: CommandResult) {
        assert_eq!(
            result,
            CommandResult::Refused {
                reason: STANDING_CHANGED.into()
            }
        );
    }

    /// The attack: a follower that has not applied a token's deletion
    /// judges its write and forwards it; the leader's state machine, which
    /// has, applies nothing. The refusal is not the request's recorded
    /// result: sent again, it is judged anew.
    #[test]
    fn a_token_deleted_after_judging_writes_nothing() {
        let (mut s, judged) = with_token();
        s.apply(
            Command::AclTokenDelete {
                accessor: "t".into(),
            },
            3,
        );
        refused_as_changed(s.apply(once("r1", put("app/x"), &judged), 4).0);
        assert!(!s.kv.contains_key("app/x"));
        assert_eq!(s.sessions.result("judged", "r1"), None);
    }

    /// A policy narrowed, deleted or the token's links changed after
    /// judging: refused; the same token unchanged (other ACL writes
    /// meanwhile): applied.
    #[test]
    fn what_changes_the_tokens_rights_refuses_and_nothing_else_does() {
        let (mut s, judged) = with_token();
        s.apply(Command::AclPolicyUpsert(policy("q", "")), 3);
        s.apply(Command::AclTokenUpsert(token("u", "secret-u", &["q"])), 4);
        assert!(s.still_stands(&judged), "unrelated ACL writes changed it");
        assert_eq!(
            s.apply(once("r1", put("app/x"), &judged), 5).0,
            CommandResult::Applied { index: 5 }
        );

        // Written again as it was (a secondary's replication rewrites
        // every policy and token it copies): the same rights.
        s.apply(
            Command::AclPolicyUpsert(policy("p", r#"key_prefix "app/" { policy = "write" }"#)),
            6,
        );
        let same = s.acl.tokens["t"].clone();
        s.apply(Command::AclTokenUpsert(same), 7);
        assert!(s.still_stands(&judged), "a rewrite of the same rights");

        let narrowed = policy("p", r#"key_prefix "app/" { policy = "read" }"#);
        s.apply(Command::AclPolicyUpsert(narrowed), 8);
        refused_as_changed(s.apply(once("r2", put("app/y"), &judged), 9).0);

        let (mut s, judged) = with_token();
        s.apply(Command::AclPolicyDelete { id: "p".into() }, 3);
        assert!(!s.still_stands(&judged), "a linked policy deleted");

        let (mut s, judged) = with_token();
        let mut relinked = s.acl.tokens["t"].clone();
        relinked.policies = vec![];
        s.apply(Command::AclTokenUpsert(relinked), 3);
        assert!(!s.still_stands(&judged), "a policy unlinked");
    }

    /// A node certificate's write judged while its node was registered:
    /// refused once the node is deregistered, and once it was registered
    /// again since (a new registration is not the one judged); a
    /// certificate's registration never brings its deregistered node back.
    #[test]
    fn a_node_certificate_writes_only_while_its_node_stays() {
        let mut s = State::default();
        s.apply(Command::RegisterNode(node("n1")), 1);
        let judged = Standing::of_node(&s.nodes["n1"]);
        assert_eq!(
            s.apply(once("r1", Command::RegisterNode(node("n1")), &judged), 2)
                .0,
            CommandResult::Applied { index: 2 }
        );
        assert!(s.still_stands(&judged), "its own update changed it");

        let gone = Command::DeregisterNode {
            name: "n1".into(),
            now_ms: 0,
        };
        s.apply(gone, 3);
        refused_as_changed(
            s.apply(once("r2", Command::RegisterNode(node("n1")), &judged), 4)
                .0,
        );
        assert!(
            !s.nodes.contains_key("n1"),
            "the certificate brought its node back"
        );

        s.apply(Command::RegisterNode(node("n1")), 5);
        assert!(
            !s.still_stands(&judged),
            "judged on the registration before"
        );
    }
}
