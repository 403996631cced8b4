//! Message headers: what a Kafka message carries beside its key and value,
//! what the outbox stores with a record, and what the decoders read. Names
//! are text (Kafka defines them as strings); values are bytes, since a dead
//! letter keeps the original ones whatever they hold.

/// One header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Headers in the order they were given; a name may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Adds a header after the others.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push(Header {
            name: name.into(),
            value: value.into(),
        });
    }

    /// The value of the first header named `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The value of the first header named `name`, as text (none when it is
    /// not UTF-8).
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Each header as (name, value), in order.
    pub fn iter(&self) -> Pairs<'_> {
        self.0.iter().map(Header::pair as fn(&Header) -> (&str, &[u8]))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Header {
    fn pair(&self) -> (&str, &[u8]) {
        (&self.name, &self.value)
    }
}

/// The headers of [`Headers::iter`], as (name, value).
pub type Pairs<'a> = std::iter::Map<std::slice::Iter<'a, Header>, fn(&'a Header) -> (&'a str, &'a [u8])>;

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a [u8]);
    type IntoIter = Pairs<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(headers: I) -> Self {
        let mut all = Self::new();
        all.extend(headers);
        all
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, headers: I) {
        for (name, value) in headers {
            self.push(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_header_of_a_name_is_the_one_read() {
        let headers: Headers = [("a", &b"1"[..]), ("b", b"\xff"), ("a", b"2")].into_iter().collect();
        assert_eq!(headers.get("a"), Some(&b"1"[..]));
        assert_eq!(headers.text("a"), Some("1"));
        assert_eq!(headers.text("b"), None, "not UTF-8");
        assert_eq!(headers.get("c"), None);
        assert_eq!(headers.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["a", "b", "a"]);
    }
}
