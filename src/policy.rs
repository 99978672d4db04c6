//! Who may use an identity. Decided only from what the kernel captured when
//! the caller connected (uid, gid, supplementary groups), never from the
//! pid or executable, which a caller can race or fake.

use crate::peer::Caller;

/// The uids and gids an identity admits.
///
/// Invariant: not empty (a policy that can never match is a config error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Policy {
    /// ssh-agent's rule for an identity without a policy: the agent's own
    /// uid and root.
    pub fn owner_and_root(euid: u32) -> Self {
        let mut uids = vec![0, euid];
        uids.dedup();
        Policy {
            uids,
            gids: Vec::new(),
        }
    }

    /// A policy from `allow_*` lists; `None` if it could never match.
    pub fn new(mut uids: Vec<u32>, mut gids: Vec<u32>) -> Option<Self> {
        uids.sort_unstable();
        uids.dedup();
        gids.sort_unstable();
        gids.dedup();
        (!uids.is_empty() || !gids.is_empty()).then_some(Policy { uids, gids })
    }

    /// Whether the caller's uid, primary gid or any supplementary group is
    /// admitted.
    pub fn admits(&self, caller: &Caller) -> bool {
        self.uids.contains(&caller.peer.uid)
            || self.gids.contains(&caller.peer.gid)
            || caller.groups.iter().any(|gid| self.gids.contains(gid))
    }

    /// `uids [..] gids [..]`, for `check` and logs.
    pub fn describe(&self) -> String {
        format!("uids {:?} gids {:?}", self.uids, self.gids)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::peer::Peer;

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller::new(
            Peer {
                uid,
                gid,
                pid: None,
            },
            Arc::from(groups),
            None,
        )
    }

    #[test]
    fn the_default_admits_the_owner_and_root_only() {
        let policy = Policy::owner_and_root(1000);
        assert!(policy.admits(&caller(1000, 1000, &[])));
        assert!(policy.admits(&caller(0, 0, &[])));
        assert!(!policy.admits(&caller(1001, 1000, &[1000])));
        assert_eq!(
            Policy::owner_and_root(0),
            Policy::new(vec![0], vec![]).unwrap()
        );
    }

    #[test]
    fn uids_primary_gids_and_supplementary_groups_are_admitted() {
        let policy = Policy::new(vec![42], vec![7]).unwrap();
        assert!(policy.admits(&caller(42, 1, &[])));
        assert!(policy.admits(&caller(1, 7, &[])));
        assert!(policy.admits(&caller(1, 1, &[3, 7])));
        assert!(!policy.admits(&caller(1, 1, &[3, 8])));
    }

    #[test]
    fn a_policy_that_can_never_match_is_refused() {
        assert_eq!(Policy::new(vec![], vec![]), None);
    }
}
