//! The identifiers of a controller's I/O queues: 1 to the number granted, lowest free first
//! (QID 0 is the admin queue's).

/// Queue identifiers 1..=granted, lowest free first.
#[derive(Debug)]
pub(super) struct QidPool {
    used: Vec<bool>,
}

impl QidPool {
    pub(super) fn new(granted: u16) -> Self {
        QidPool {
            used: vec![false; usize::from(granted)],
        }
    }

    pub(super) fn alloc(&mut self) -> Option<u16> {
        let i = self.used.iter().position(|u| !u)?;
        self.used[i] = true;
        u16::try_from(i + 1).ok()
    }

    pub(super) fn free(&mut self, qid: u16) {
        if let Some(u) = usize::from(qid)
            .checked_sub(1)
            .and_then(|i| self.used.get_mut(i))
        {
            *u = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_handed_out_lowest_first_and_reused_after_free() {
        let mut p = QidPool::new(3);
        assert_eq!(
            (p.alloc(), p.alloc(), p.alloc()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(p.alloc(), None, "only three granted");
        p.free(2);
        assert_eq!(p.alloc(), Some(2));
        // QID 0 is the admin queue, and QIDs past the grant were never handed out.
        p.free(0);
        p.free(9);
        assert_eq!(p.alloc(), None);
        p.free(1);
        p.free(3);
        assert_eq!((p.alloc(), p.alloc()), (Some(1), Some(3)));
        assert_eq!(QidPool::new(0).alloc(), None);
    }
}
